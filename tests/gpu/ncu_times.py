"""Per-kernel device times from an ncu CSV of gpu__time_duration.sum (--print-units base --csv):
one line per kernel, in launch order: median, min, max in us and the launch count."""
import collections, csv, statistics, sys

rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
if not rows:
    sys.exit(f"{sys.argv[1]}: no ncu rows")
hdr = rows[0]
name, value = hdr.index("Kernel Name"), hdr.index("Metric Value")
times = collections.defaultdict(list)  # insertion order = first launch order
for r in rows[1:]:
    times[r[name][:70]].append(float(r[value].replace(",", "")) / 1000)
for k, v in times.items():
    print(f"{statistics.median(v):9.2f} us (min {min(v):.2f}, max {max(v):.2f}) x{len(v):3d}  {k}")
