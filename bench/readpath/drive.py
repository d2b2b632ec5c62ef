import random, subprocess, statistics, sys, os, collections
rounds = int(sys.argv[1]); variants = [v.split(":") for v in sys.argv[2:]]
res = collections.defaultdict(list); loads = []
for r in range(rounds):
    order = variants[:]; random.shuffle(order)
    for v in order:
        out = subprocess.run(["./target/release/readexp", os.environ.get("DATA", "data.bin")] + v, capture_output=True, text=True, check=True).stdout
        res[":".join(v)].append(float(out.split()[3]))
    loads.append(os.getloadavg()[0])
    print(f"round {r+1} load {loads[-1]:.2f}", file=sys.stderr)
base = statistics.median(res["dd"]) if "dd" in res else None
pr = {k: statistics.median([x / d for x, d in zip(xs, res["dd"])]) for k, xs in res.items()}
for k, xs in res.items():
    m = statistics.median(xs)
    print(f"{k:24} median {m:.3f} GB/s  ratio_vs_dd {m/base if base else 0:.2f} median_paired_ratio {pr[k]:.2f}  all {' '.join(f'{x:.2f}' for x in xs)}")
print(f"load during: {min(loads):.2f}-{max(loads):.2f}")
