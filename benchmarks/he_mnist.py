"""Encrypted inference on MNIST (issues 9, 18): python benchmarks/he_mnist.py [--modes batch latency]

batch mode (actswap.he.batch, CryptoNets packing): all --limit (10,000) MNIST
test images, encrypted, evaluated and decrypted, through the committed
CryptoNets-style square network (fixtures/cryptonets_mnist.keras, 5 filters)
and through the 8-filter network of the recovery benchmark
(benchmarks/recovery_mnist.py ``train_cryptonets``, seed 0, 30 epochs; trained
once and cached in build/he_mnist/, or --model8 PATH). latency mode: the first
--latency-limit (100) images through the fixture, one ciphertext per image.

Also measures the per-operation costs the batch evaluator is built on (SEAL
through tenseal.sealapi vs TenSEAL's vectors, N=8192). Keeps every result in
docs/he_mnist.json (so a run of one mode keeps the other's figures) and writes
its section ("he") of docs/benchmarks.md from it, with CryptoNets' and LoLa's
published figures beside ours. Needs ../shared/data/mnist and `pip install '.[he]'`.
"""

from __future__ import annotations

# TenSEAL before TensorFlow: loaded after it, TenSEAL's serialize() crashes
# (their protobuf libraries clash), and the public context size needs serialize().
import tenseal  # noqa: F401,I001

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "fixtures"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import mnist  # noqa: E402
from docsection import write_section  # noqa: E402

RESULTS = ROOT / "docs" / "he_mnist.json"
MODEL5 = "fixtures/cryptonets_mnist.keras"
MODEL8 = "build/he_mnist/cryptonets8_seed0.keras"


def op_timings(repeat: int = 300) -> dict[str, float]:
    """Milliseconds per operation at N=8192 on a fresh 6-prime ciphertext (the
    fixture's first level), one core: what decides how an affine stage is run."""
    import numpy as np
    import tenseal as ts
    import tenseal.sealapi as sa

    ctx = ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[39, 27, 27, 27, 27, 27, 39])
    ctx.global_scale = 2.0**27
    x = np.random.default_rng(0).uniform(0, 1, 4096).tolist()

    def ms(f, n=repeat):
        t = time.perf_counter()
        for _ in range(n):
            f()
        return (time.perf_counter() - t) / n * 1e3

    out: dict[str, float] = {}
    v, w = ts.ckks_vector(ctx, x), ts.ckks_vector(ctx, x)
    out["tenseal: ciphertext x scalar (rescales)"] = ms(lambda: v * 0.37)
    ctx.auto_rescale = False
    out["tenseal: ciphertext x scalar, auto_rescale off"] = ms(lambda: v * 0.37)
    out["tenseal: ciphertext + ciphertext"] = ms(lambda: v + w)
    ctx.auto_rescale = True
    seal = ctx.seal_context().data
    ev, enc = sa.Evaluator(seal), sa.CKKSEncoder(seal)
    pt, ct, acc, tmp = sa.Plaintext(), sa.Ciphertext(), sa.Ciphertext(), sa.Ciphertext()
    enc.encode(x, 2.0**27, pt)
    out["sealapi: encode a batch of 4,096 values"] = ms(lambda: enc.encode(x, 2.0**27, pt), 30)
    encryptor = sa.Encryptor(seal, ctx.public_key().data)
    out["sealapi: encrypt (public key)"] = ms(lambda: encryptor.encrypt(pt, ct), 30)
    p = sa.Plaintext()
    out["sealapi: encode a scalar"] = ms(lambda: enc.encode(0.37, ct.parms_id(), 2.0**27, p))
    out["sealapi: ciphertext x plain scalar (no rescale)"] = ms(lambda: ev.multiply_plain(ct, p, tmp))
    ev.multiply_plain(ct, p, acc)
    out["sealapi: ciphertext + ciphertext"] = ms(lambda: ev.add_inplace(acc, tmp))

    def rescale():
        r = sa.Ciphertext()
        ev.rescale_to_next(acc, r)

    out["sealapi: rescale (once per output element)"] = ms(rescale, 100)

    def square():
        r = sa.Ciphertext()
        ev.square(ct, r)
        ev.relinearize_inplace(r, ctx.relin_keys().data)

    out["sealapi: square + relinearise"] = ms(square, 50)
    return {k: round(v, 4) for k, v in out.items()}


def model8(path: Path) -> Path:
    if path.exists():
        return path
    import recovery_mnist

    print(f"training the 8-filter network (seed 0, 30 epochs) into {path}", flush=True)
    start = time.perf_counter()
    model, curve = recovery_mnist.train_cryptonets(0, mnist.load(), 30)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(path)
    print(f"trained in {time.perf_counter() - start:.0f} s, test accuracy {curve[-1]:.4f}", flush=True)
    return path


def run_one(mode: str, model: Path, x, y, workers: int | None) -> dict:
    from actswap import he

    start = time.perf_counter()

    def progress(done: int, total: int) -> None:
        if mode == "batch" or done == 1 or done % 10 == 0 or done == total:
            print(f"{mode} {model.name}: {done}/{total} samples, {time.perf_counter() - start:.0f} s", flush=True)

    report = he.run(model, x, y, mode=mode, workers=workers, progress=progress,
                    on_parameters=lambda p: print(p.describe(), flush=True))
    r = report.to_dict()
    r["run_seconds"] = time.perf_counter() - start  # compile, plaintext reference, keys and all
    r["model"] = str(model.relative_to(ROOT)) if model.is_relative_to(ROOT) else str(model)
    return r


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _params(p: dict) -> str:
    return (f"N={p['poly_modulus_degree']} ({p['slots']} slots), coefficient modulus {p['coeff_mod_bit_sizes']} = "
            f"{p['total_bits']} bits (max {p['max_bits_128']} at 128-bit security), scale 2^{p['scale_bits']}, "
            f"depth {p['depth']}")


def batch_table(r: dict) -> str:
    lat, size, rss = r["batch_latency_seconds"], r["ciphertext_bytes"], r["peak_rss_bytes"]
    rows = [
        ("samples (MNIST test images)", f"{r['samples']:,}"),
        ("batches x samples per batch, worker processes", f"{r['batches']} x {r['batch_size']:,}, {r['workers']}"),
        ("end to end: encrypt + evaluate + decrypt, all batches (wall)", f"{r['wall_seconds']:.0f} s"),
        ("throughput", f"{r['throughput_per_second']:.1f} images/s ({r['throughput_per_second'] * 3600:,.0f} per hour)"),
        ("per batch: encrypt / evaluate / decrypt (mean; slowest evaluate)",
         f"{lat['encrypt']['mean']:.1f} s / {lat['evaluate']['mean']:.1f} s / {lat['decrypt']['mean']:.2f} s "
         f"({lat['evaluate']['max']:.1f} s)"),
        ("top-1 agreement, encrypted vs plaintext", f"{r['top1_agreement']:.4f} ({len(r['disagreements'])} differ)"),
        ("max abs logit error (max relative)", f"{r['max_abs_logit_error']:.3g} ({r['max_rel_logit_error']:.2g})"),
        ("accuracy plaintext / encrypted", f"{r['plaintext_accuracy']:.4f} / {r['encrypted_accuracy']:.4f}"),
        ("ciphertexts in / out per batch",
         f"{_mb(size['input'])} ({size['input'] // size['input_ciphertext']} x {_mb(size['input_ciphertext'])}) / "
         f"{_mb(size['output'])}"),
        ("public context (public and relinearisation keys; no Galois keys)", _mb(size.get("public_context", 0))),
        ("peak memory (RSS): main process / largest worker",
         " / ".join(_mb(rss[k]) for k in ("main", "worker") if k in rss)),
        ("whole run (compile, plaintext reference, keys, encrypted run)", f"{r['run_seconds']:.0f} s"),
        ("CKKS parameters", _params(r["parameters"])),
    ]
    return "\n".join(["| figure | value |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows])


def latency_table(r: dict) -> str:
    lat, size = r["latency_seconds"], r["ciphertext_bytes"]
    rows = [
        ("samples (first MNIST test images)", str(r["samples"])),
        ("packing", r["packing"]),
        ("latency per image: encrypt / evaluate / decrypt (mean; slowest evaluate)",
         f"{lat['encrypt']['mean']:.3f} s / {lat['evaluate']['mean']:.2f} s / {lat['decrypt']['mean']:.4f} s "
         f"({lat['evaluate']['max']:.2f} s)"),
        ("setup, once: keys and planning every product", f"{r['setup_seconds']:.1f} s"),
        ("top-1 agreement, encrypted vs plaintext", f"{r['top1_agreement']:.4f} ({len(r['disagreements'])} differ)"),
        ("max abs logit error (max relative)", f"{r['max_abs_logit_error']:.3g} ({r['max_rel_logit_error']:.2g})"),
        ("accuracy plaintext / encrypted", f"{r['plaintext_accuracy']:.4f} / {r['encrypted_accuracy']:.4f}"),
        ("ciphertext in / out", f"{_mb(size['input'])} / {_mb(size['output'])}" if "input" in size else "not measured"),
        ("public context", _mb(size["public_context"]) if "public_context" in size else "not measured"),
        ("CKKS parameters", _params(r["parameters"])),
    ]
    return "\n".join(["| figure | value |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows])


def section(results: dict) -> str:
    b5, b8, lat = results.get("batch:5"), results.get("batch:8"), results.get("latency:5")
    ours = []
    for key, name in (("batch:5", "5 filters (fixture)"), ("batch:8", "8 filters")):
        r = results.get(key)
        if r:
            ours.append(f"| actswap batch mode, {name} | {r['samples']:,} images, {r['batches']} batches of "
                        f"{r['batch_size']:,} | {r['encrypted_accuracy']:.2%} | {r['throughput_per_second'] * 3600:,.0f} "
                        f"| {r['batch_latency_seconds']['evaluate']['mean'] + r['batch_latency_seconds']['encrypt']['mean']:.0f} s per batch "
                        f"| 2 shared cores |")
    if lat:
        ours.append(f"| actswap latency mode, 5 filters (fixture) | {lat['samples']} images, one at a time | "
                    f"{lat['encrypted_accuracy']:.2%} | {lat['throughput_per_second'] * 3600:,.0f} | "
                    f"{sum(v['mean'] for v in lat['latency_seconds'].values()):.2f} s per image | 1 core |")
    # Issue 9's figures (TenSEAL's CKKSVector.mm, before issue 18), for scale.
    ours.append("| actswap before issue 18 (TenSEAL `CKKSVector.mm`), fixture | 100 images, one at a time | "
                "100.00% | 65 | 55.0 s per image | 2 shared cores |")
    compare = "\n".join([
        "| | images | accuracy | predictions per hour | latency | hardware |",
        "|---|---|---|---|---|---|",
        "| CryptoNets (Dowlin et al. 2016), published | batches of 4,096 | 98.95% | 58,982 | 250 s per batch | one PC |",
        "| LoLa (Brutzkus et al. 2019), published | one at a time | | | 2.2 s per image | |",
    ] + ours)
    ops = results.get("ops", {})
    op_lines = "\n".join(f"| {k} | {v:.3f} ms |" for k, v in ops.items())
    parts = [f"""## Encrypted inference on MNIST (issues 9, 18)

Commands: `{results.get('command:batch', 'python benchmarks/he_mnist.py --modes batch')}` (batch mode) and
`{results.get('command:latency', 'python benchmarks/he_mnist.py --modes latency')}` (latency mode); every result is kept in
`docs/he_mnist.json`, this section is written from it.

{compare}

Published figures are the papers' own (other hardware, other libraries); ours are measured here, end to
end (encrypt, evaluate, decrypt) on 2 shared cores. Accuracy is on the MNIST test images run.
"""]
    for key, title in (("batch:5", "Batch mode, fixture (`fixtures/cryptonets_mnist.keras`, 5 filters)"),
                       ("batch:8", "Batch mode, 8 filters (the recovery benchmark's 99% network)")):
        r = results.get(key)
        if r:
            acc_target = (f"top-1 agreement >= 99.9%: {'met' if r['top1_agreement'] >= 0.999 else 'not met'}"
                          if key == "batch:5" else
                          f"encrypted accuracy >= 99.0%: {'met' if r['encrypted_accuracy'] >= 0.99 else 'not met'}")
            full = r["samples"] >= 10000 and r["wall_seconds"] <= 300
            trained = (" (trained by this script if missing: `recovery_mnist.train_cryptonets`, seed 0, 30 "
                       "epochs, ~5 min)") if key == "batch:8" else ""
            parts.append(f"### {title}\n\nModel `{r['model']}`{trained}.\n\n{batch_table(r)}\n\n"
                         f"Targets (issue 18): all 10,000 images in <= 5 minutes: {'met' if full else 'not met'}; "
                         f"{acc_target}.\n")
    if b5 or b8:
        parts.append(f"""Packing: {(b5 or b8)['packing']}. Cores: the first two batches run
side by side in two forked worker processes; the third then has both cores, its dense layer's
columns shared between two processes (a convolution's 25-product sums are not worth shipping back).
Per-batch times above are each batch's own, measured while other batches (and, on this shared
machine, other jobs) ran beside it.

Where the time goes (measured by this benchmark, one core, N=8192, 6 primes):

| operation | time |
|---|---|
{op_lines}

TenSEAL's vectors rescale after every product and its Python API has no explicit rescale (with
`auto_rescale` off a product stays at scale 2^54 and cannot be brought down), so the batch evaluator
drives SEAL through TenSEAL's bundled binding (`tenseal.sealapi`): it adds an output's products
unrescaled and rescales once. TenSEAL's `CKKSTensor(batch=True)` (one sample per slot too) is no way
round it (measured once, idle machine, same parameters): its element-wise product by a plain vector
rescales each product (1.43 ms per product); its `dot` and `sum` reduce over the *sample* axis, with
rotations (Galois keys needed; 1.6 s for a 25-element column); and its `mm` with the dense 784 x 980
matrix did not finish a 256-image batch in 15 minutes (issue 18).
""")
    if lat:
        per_image = sum(v["mean"] for v in lat["latency_seconds"].values())
        met = lat["samples"] >= 100 and lat["top1_agreement"] == 1.0 and per_image <= 10
        parts.append(f"### Latency mode, fixture\n\n{latency_table(lat)}\n\n"
                     f"Target (issue 18): <= 10 s per image, agreement 100% on 100 images: "
                     f"{'met' if met else 'not met'}.\n")
    return "\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="*", choices=["batch", "latency"], default=["batch", "latency"],
                        help="what to run; none: only rewrite the section from docs/he_mnist.json")
    parser.add_argument("--limit", type=int, default=10000, help="batch mode: first N test images")
    parser.add_argument("--latency-limit", type=int, default=100, help="latency mode: first N test images")
    parser.add_argument("--model8", default=MODEL8, help="the 8-filter network (trained here if missing)")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--no-doc", action="store_true", help="Do not write docs/benchmarks.md or docs/he_mnist.json.")
    args = parser.parse_args()
    if not mnist.available():
        sys.exit(f"MNIST not found at {mnist.DEFAULT_DIR}")
    data = mnist.load()
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if "batch" in args.modes:
        results["ops"] = op_timings()
        print(json.dumps(results["ops"], indent=1), flush=True)
        x, y = data["x_test"][: args.limit], data["y_test"][: args.limit]
        for key, path in (("batch:5", ROOT / MODEL5), ("batch:8", model8(ROOT / args.model8))):
            results[key] = run_one("batch", path, x, y, args.workers)
            print(json.dumps({k: v for k, v in results[key].items() if k != "disagreements"}, indent=1), flush=True)
        results["command:batch"] = "python benchmarks/he_mnist.py --modes batch" + (
            f" --limit {args.limit}" if args.limit != 10000 else "")
    if "latency" in args.modes:
        x, y = data["x_test"][: args.latency_limit], data["y_test"][: args.latency_limit]
        results["latency:5"] = run_one("latency", ROOT / MODEL5, x, y, None)
        print(json.dumps(results["latency:5"], indent=1), flush=True)
        results["command:latency"] = "python benchmarks/he_mnist.py --modes latency" + (
            f" --latency-limit {args.latency_limit}" if args.latency_limit != 100 else "")
    if not args.no_doc:
        RESULTS.write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {RESULTS} and {write_section('he', section(results))}")


if __name__ == "__main__":
    main()
