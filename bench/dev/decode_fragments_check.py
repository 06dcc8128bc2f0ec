"""Checks the token-code layout of hopper_decode_layer.patch (backends/hopper_fp8/decode.cuh: frag_addr, put_codes'
stores, TokenFrag::load) on the CPU: token rows of m = 1..8 tokens over several K blocks are written the way put_codes
writes them (16 codes a chunk, each 4-byte word where frag_addr puts it), then read the way TokenFrag::load reads them
(lane (g, q): two 16-byte loads of token g's row, swizzled by g), and every lane's words must be the wgmma register-A
fragment of m64nNk32 e4m3 for rows 0..7 (assumed as mma.m16n8k32's per warp: reg 0 = row g at K 32s + 4q .. +3,
reg 2 = row g at K 32s + 16 + 4q .. +3, regs 1 and 3 = row g + 8, here zero). Also checks that each quarter warp's
16-byte loads hit eight different bank groups. What it cannot check is that assumption itself: the GPU suite does.
Run: python3 bench/dev/decode_fragments_check.py
"""


def frag_addr(row, t, kw):  # decode.cuh's frag_addr
    d = 8 * (kw % 4) + 2 * (kw // 8) + (kw // 4) % 2
    return row + ((((d >> 2) ^ t) & 7) << 4) + 4 * (d & 3)


def check(m, nkb):
    mem = {}
    for kb in range(nkb):
        for t in range(m):
            row = (kb * m + t) * 128  # put_codes: row kb * m + t of the tile
            for c in range(8):  # chunk c: codes 16c .. 16c + 15 of the K block, words j = 0..3
                for j in range(4):
                    a = frag_addr(row, t, 4 * c + j)
                    assert a not in mem, "two words at one address"
                    mem[a] = (t, kb, [16 * c + 4 * j + i for i in range(4)])
    for kb in range(nkb):
        base = kb * m * 128
        for g in range(m):
            for q in range(4):
                row = base + g * 128  # TokenFrag::load
                words = [mem[row + ((ch ^ g) << 4) + 4 * w] for ch in (2 * q, 2 * q + 1) for w in range(4)]
                for s in range(4):
                    assert words[2 * s] == (g, kb, [32 * s + 4 * q + i for i in range(4)]), (m, kb, g, q, s)
                    assert words[2 * s + 1] == (g, kb, [32 * s + 16 + 4 * q + i for i in range(4)]), (m, kb, g, q, s)
        for p in range(4):  # quarter warp p: lanes 8p .. 8p + 7, tokens 2p, 2p + 1 (those < m load)
            for ch0 in (0, 1):
                banks = [((base + g * 128 + (((2 * q + ch0) ^ g) << 4)) // 16) % 8
                         for lane in range(8 * p, 8 * p + 8) for g, q in [(lane // 4, lane % 4)] if g < m]
                assert len(banks) == len(set(banks)), (m, p, banks)


for m in range(1, 9):
    for nkb in (1, 3):
        check(m, nkb)
print("decode_fragments_check: ok")
