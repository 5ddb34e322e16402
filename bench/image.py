"""Container images of the blueprints, with a real engine (tests/engine.py; install one with
`bash tests/containers.sh install`): size, build times, start-up.

    python bench/image.py [--blueprints default,text-classifier,interactive-ner] [--starts 5]

Per blueprint, on a backend `label-studio-ml create` wrote:
- size: the image's size over its base image (python:3.11-slim; here a local stand-in, so only
  the difference means anything), the largest layers, and for a backend with requirements the
  largest installed packages. Targets: default <= 50 MB over the base; text-classifier nothing
  beyond the scikit-learn stack (scikit-learn, SciPy, NumPy, joblib, threadpoolctl);
- build: a cold build (on a base of the run's own, so no cached layer matches; pip downloads
  every package) against a rebuild after a code-only change (a line added to model.py), which
  must reuse the dependency layer: the ratio rebuild/cold (target <= 0.2) and whether every
  layer below the code was reused;
- start: from `run` to the first 200 on /health, the image as a container against the same
  backend as a process (`label-studio-ml start` in this venv), in alternating pairs so machine
  noise hits both alike; the ratio of the medians container/process (target <= 1.5). Also the
  engine's own cost (a `run` of `true` in the same image) and the server's start without it.
"""
from __future__ import annotations

import argparse
import http.client
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from engine import BASE_IMAGE, engine, why_no_engine  # noqa: E402
from support import free_port  # noqa: E402

MB = 1e6
PACKAGE_SIZES = r'''
import os, sys, sysconfig
root = sysconfig.get_paths()["purelib"]
if not os.path.isdir(root) or not os.listdir(root):
    root = "/usr/local/lib/python3.11/dist-packages"
sizes = {}
for name in os.listdir(root):
    total = 0
    for base, _, files in os.walk(os.path.join(root, name)):
        total += sum(os.path.getsize(os.path.join(base, f)) for f in files if not os.path.islink(os.path.join(base, f)))
    key = name.split("-")[0].lower() if name.endswith(".dist-info") else name
    if not name.endswith(".dist-info") and total:
        sizes[key] = sizes.get(key, 0) + total
for name, size in sorted(sizes.items(), key=lambda kv: -kv[1])[:10]:
    print(f"{size} {name}")
'''


def healthy(port: int, began: float, alive, timeout: float = 120.0) -> float:
    """Seconds from `began` to the first 200 on /health."""
    while True:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return time.perf_counter() - began
        except OSError:
            pass
        if not alive():
            raise SystemExit("the server exited before /health answered")
        if time.perf_counter() - began > timeout:
            raise SystemExit(f"/health did not answer within {timeout:.0f} s")
        time.sleep(0.01)


def start_container(eng, tag: str) -> float:
    port = free_port()
    began = time.perf_counter()
    box = eng.run(tag, env={}, port=port)
    try:
        return healthy(port, began, box.running)
    finally:
        box.kill("TERM")
        box.wait(30)
        box.remove()


def start_process(directory: Path, workdir: Path) -> float:
    port = free_port()
    env = {**os.environ, "MODEL_DIR": str(workdir / f"state-{port}"), "PYTHONDONTWRITEBYTECODE": "1"}
    argv = [sys.executable, "-m", "lsdeploy.cli", "start", str(directory), "--port", str(port), "--host", "127.0.0.1"]
    began = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        return healthy(port, began, lambda: proc.poll() is None)
    finally:
        proc.terminate()
        proc.wait(30)


def timed_build(eng, directory: Path, tag: str, **kwargs) -> tuple:
    began = time.perf_counter()
    image = eng.build(directory, tag, **kwargs)
    return image, time.perf_counter() - began


def bench_blueprint(eng, blueprint: str, starts: int, workdir: Path) -> dict:
    from lsdeploy.blueprints import create

    directory = workdir / blueprint
    create(directory, blueprint=blueprint)
    tag = f"localhost/lsdeploy-bench/{blueprint}:latest"
    # A base of this run's own (the base image plus a label): no layer cached by an earlier build
    # on this machine can match, so the first build is cold, and the rebuild can reuse only this
    # run's layers. (buildah takes the first cached chain that matches a step, and another
    # chain's next layer, say an older lsdeploy wheel, would then rebuild what should be reused.)
    run_id = uuid.uuid4().hex[:12]
    (workdir / f"base-{run_id}").mkdir()
    (workdir / f"base-{run_id}" / "Dockerfile").write_text(f"FROM {BASE_IMAGE}\nLABEL lsdeploy.bench.run={run_id}\n")
    eng.build(workdir / f"base-{run_id}", f"docker.io/library/python:3.11-bench{run_id}-slim")
    build_args = {"PYTHON_VERSION": f"3.11-bench{run_id}"}
    _, cold = timed_build(eng, directory, tag, build_args=build_args)
    before = eng.layer_ids(tag)
    size = eng.size(tag) - eng.size(BASE_IMAGE)
    layers = sorted(eng.layers(tag), key=lambda layer: -layer[1])[:3]
    packages = []
    done = eng.call(["run", "--rm", "--network", "none", tag, "python", "-c", PACKAGE_SIZES], check=False)
    for line in done.stdout.splitlines():
        number, _, name = line.partition(" ")
        packages.append((name, int(number)))

    with open(directory / "model.py", "a") as model:
        model.write("\n# a code-only change\n")
    _, rebuild = timed_build(eng, directory, tag, build_args=build_args)
    after = eng.layer_ids(tag)
    shared = sum(1 for a, b in zip(before, after) if a == b)

    container, process, engine_only = [], [], []
    for _ in range(starts):
        container.append(start_container(eng, tag))
        process.append(start_process(directory, workdir))
        began = time.perf_counter()  # the engine's own cost: run a container that does nothing
        eng.call(["run", "--rm", "--network", "host", tag, "true"])
        engine_only.append(time.perf_counter() - began)
    eng.cleanup()
    return {"blueprint": blueprint, "size": size, "layers": layers, "packages": packages, "cold": cold,
            "rebuild": rebuild, "reused": shared == len(after) - 1 and len(before) == len(after),
            "shared": shared, "total_layers": len(after),
            "container": statistics.median(container), "process": statistics.median(process),
            "engine": statistics.median(engine_only), "container_runs": container, "process_runs": process}


def report(r: dict) -> None:
    print(f"{r['blueprint']}")
    print(f"  size over the base       {r['size'] / MB:7.1f} MB" +
          ("   (target <= 50 MB)" if r["blueprint"] == "default" else ""))
    for instruction, size in r["layers"]:
        print(f"    layer {size / MB:7.1f} MB  {' '.join(instruction.split())[:90]}")
    if r["packages"]:
        print("    largest packages: " + ", ".join(f"{name} {size / MB:.1f} MB" for name, size in r["packages"][:7]))
    print(f"  cold build               {r['cold']:7.1f} s")
    print(f"  rebuild after a code-only change {r['rebuild']:5.1f} s   ratio rebuild/cold = "
          f"{r['rebuild'] / r['cold']:.3f}  (target <= 0.2); layers reused {r['shared']}/{r['total_layers']}"
          f"{'' if r['reused'] else '  NOT ONLY THE CODE LAYER REBUILT'}")
    print(f"  start to healthy /health (median of {len(r['container_runs'])} pairs): container "
          f"{r['container']:.3f} s, process {r['process']:.3f} s, ratio container/process = "
          f"{r['container'] / r['process']:.3f}  (target <= 1.5)")
    print(f"    container runs: {', '.join(f'{t:.2f}' for t in r['container_runs'])}; "
          f"process runs: {', '.join(f'{t:.2f}' for t in r['process_runs'])}")
    print(f"    the engine alone (`run --rm IMAGE true`, median): {r['engine']:.3f} s; the server's own start in the "
          f"container {r['container'] - r['engine']:.3f} s, ratio to the process = "
          f"{(r['container'] - r['engine']) / r['process']:.3f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blueprints", default="default,text-classifier,interactive-ner")
    parser.add_argument("--starts", type=int, default=5)
    args = parser.parse_args()
    eng = engine()
    if eng is None:
        raise SystemExit(f"no container engine: {why_no_engine()}")
    load_before = os.getloadavg()[0]
    print(f"engine: {eng.name}; base {BASE_IMAGE} {eng.size(BASE_IMAGE) / MB:.1f} MB")
    workdir = Path(tempfile.mkdtemp(prefix="lsdeploy-bench-image-"))
    try:
        for blueprint in args.blueprints.split(","):
            report(bench_blueprint(eng, blueprint.strip(), args.starts, workdir))
    finally:
        eng.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"machine load average (1 min) before {load_before:.2f}, after {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPU(s)")


if __name__ == "__main__":
    main()
