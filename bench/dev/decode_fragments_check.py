"""Emulates the operand reads of hopper_decode_layer.patch (backends/hopper_fp8/decode.cuh: mma_block, swz, tok_swz,
put_codes' layout) on the CPU: weights placed by TMA's 128B swizzle, token codes placed swizzled by token, each lane's
16-byte chunks split into mma.sync m16n8k32 e4m3 fragments (PTX: A reg 0 / 2 = row g at k 4q.. / 16 + 4q.., reg 1 / 3 =
row g + 8; B reg 0 / 1 = column g at k 4q.. / 16 + 4q..; D: rows g, g + 8, columns 2q, 2q + 1), and checks that every
(row, token) result equals the plain dot product over the 128-byte K block. Run: python3 bench/dev/decode_fragments_check.py
"""
import random


def tma_tile(rows):  # 128-byte rows -> shared memory bytes under CU_TENSOR_MAP_SWIZZLE_128B (1024-byte aligned)
    sm = [0] * (len(rows) * 128)
    for r, row in enumerate(rows):
        for k in range(128):
            sm[r * 128 + ((k // 16) ^ (r % 8)) * 16 + k % 16] = row[k]
    return sm


def swz(row, c):
    return row * 128 + ((c ^ (row & 7)) << 4)


def tok_swz(row, t, c):
    return row * 128 + ((c ^ t) << 4)


def lds128(sm, a):
    return sm[a:a + 16]


def word(b16, i):  # .x .y .z .w of a 16-byte load
    return b16[4 * i:4 * i + 4]


def check(rows_of, a_rows, m, nkb):
    """rows_of(g) = (ra, rb): the tile rows a lane's MMA rows g and g + 8 read; a_rows: rows in the tile."""
    A = [[random.randint(-8, 8) for _ in range(128)] for _ in range(a_rows)]
    X = [[random.randint(-8, 8) for _ in range(128 * nkb)] for _ in range(m)]
    sa = tma_tile(A)
    sb = [0] * (nkb * m * 128)
    for t in range(m):  # put_codes: chunk c of token t at tok_swz((c / 8) * m + t, t, c % 8)
        for c in range(nkb * 8):
            a = tok_swz((c // 8) * m + t, t, c % 8)
            sb[a:a + 16] = X[t][16 * c:16 * c + 16]
    for kb in range(nkb):
        D = [[0] * 8 for _ in range(16)]
        b = kb * m * 128
        lanes = []
        for lane in range(32):
            g, q = lane // 4, lane % 4
            ra, rb = rows_of(g)
            a0, a1 = lds128(sa, swz(ra, 2 * q)), lds128(sa, swz(ra, 2 * q + 1))
            b0, b1 = lds128(sa, swz(rb, 2 * q)), lds128(sa, swz(rb, 2 * q + 1))
            x0 = lds128(sb, b + tok_swz(g, g, 2 * q)) if g < m else [0] * 16
            x1 = lds128(sb, b + tok_swz(g, g, 2 * q + 1)) if g < m else [0] * 16
            lanes.append([(word(a0, 0), word(b0, 0), word(a0, 1), word(b0, 1), word(x0, 0), word(x0, 1)),
                          (word(a0, 2), word(b0, 2), word(a0, 3), word(b0, 3), word(x0, 2), word(x0, 3)),
                          (word(a1, 0), word(b1, 0), word(a1, 1), word(b1, 1), word(x1, 0), word(x1, 1)),
                          (word(a1, 2), word(b1, 2), word(a1, 3), word(b1, 3), word(x1, 2), word(x1, 3))])
        for step in range(4):  # the four mma_e4m3 calls of mma_block
            Am = [[0] * 32 for _ in range(16)]
            Bm = [[0] * 8 for _ in range(32)]
            for lane in range(32):
                g, q = lane // 4, lane % 4
                r0, r1, r2, r3, c0, c1 = lanes[lane][step]
                for i in range(4):
                    Am[g][4 * q + i], Am[g + 8][4 * q + i] = r0[i], r1[i]
                    Am[g][16 + 4 * q + i], Am[g + 8][16 + 4 * q + i] = r2[i], r3[i]
                    Bm[4 * q + i][g], Bm[16 + 4 * q + i][g] = c0[i], c1[i]
            for r in range(16):
                for n in range(8):
                    D[r][n] += sum(Am[r][k] * Bm[k][n] for k in range(32))
        for g in range(8):
            ra, rb = rows_of(g)
            for t in range(m):
                assert D[g][t] == sum(A[ra][k] * X[t][128 * kb + k] for k in range(128)), (ra, t, kb)
                assert D[g + 8][t] == sum(A[rb][k] * X[t][128 * kb + k] for k in range(128)), (rb, t, kb)


random.seed(11)
for m in range(1, 9):
    for cpart in range(2):  # decode_gate_up: a K block's 16 gate rows then 16 up rows; warp half cpart's rows
        check(lambda g, c=cpart: (8 * c + g, 16 + 8 * c + g), 32, m, 2)
    check(lambda g: (g, g + 8), 16, m, 3)  # decode_down: a 16-row box
print("decode.cuh fragments: every (row, token) equals its dot product, m = 1..8")
