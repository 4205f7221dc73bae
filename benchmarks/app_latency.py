"""`eclipse-prior app` on the shapes world: how long it takes to start and to draw a prompt (the README's figures).

- start: launching `eclipse-prior app` until its page answers (imports, loading the shipped CLIP, decoder and
  priors, starting the server); baseline in the same run: a fresh interpreter importing the same libraries
  (`import eclipse_prior.app.page`: torch, diffusers, transformers, gradio), the part of the start that is imports.
- draw: one request through the app's API (gradio_client) with the page's defaults (one image per column, the
  three default columns, 25 decoder steps, guidance 3), median of `--repeats` after one warm-up; baseline in the
  same run: the ECLIPSE column's image alone, drawn in this process through the already loaded pipeline
  (`generate_batch`), i.e. what one column costs without the app.

Each figure is given as wall seconds and as CPU seconds of the process doing the work (the app's, read from
/proc; on a shared machine the wall time mostly measures the neighbours, see common.py). The app and this process
run with the same thread count (`--threads`, default 1, the steadiest on a shared box:
see common.py). Usage: `python benchmarks/app_latency.py [--repeats 3] [--threads 1]`; writes
benchmarks/results/app-latency.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402

PROMPT = "a purple star and a yellow circle"


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a running process has consumed so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch
    from gradio_client import Client

    from eclipse_prior.app import default_columns
    from eclipse_prior.app.browser import start_app
    from eclipse_prior.pipelines.generate import GenerationSettings, generate_batch, load_pipeline

    torch.set_num_threads(args.threads)
    load_before = common.load_average()
    t0, c0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, "-c", "import eclipse_prior.app.page"], check=True,
                   env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    imports_s, c1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
    imports_cpu = c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime
    with tempfile.TemporaryDirectory() as work:
        app = start_app(Path(work), threads=args.threads)
        start_cpu = cpu_seconds(app.process.pid)
        try:
            client = Client(app.url, download_files=str(Path(work) / "dl"), verbose=False)
            draw: list[float] = []
            draw_cpu: list[float] = []
            for i in range(args.repeats + 1):
                t0, c0_app = time.perf_counter(), cpu_seconds(app.process.pid)
                status, *_ = client.predict(PROMPT, "", i, 1, 25, 3.0, 64, 25, 4.0, api_name="/generate")
                if i:
                    draw.append(time.perf_counter() - t0)
                    draw_cpu.append(cpu_seconds(app.process.pid) - c0_app)
                assert status.startswith("Drew"), status
        finally:
            app.stop()
    columns, decoder, clip = default_columns(None, [])
    loaded = load_pipeline(columns[0][1], decoder, clip, device="cpu", local_files_only=True)  # ECLIPSE
    settings = GenerationSettings(steps=25, guidance=3.0, height=64, width=64)
    one: list[float] = []
    one_cpu: list[float] = []
    for i in range(args.repeats + 1):
        t0, c0_self = time.perf_counter(), time.process_time()
        generate_batch(loaded, [(PROMPT, i)], settings)
        if i:
            one.append(time.perf_counter() - t0)
            one_cpu.append(time.process_time() - c0_self)
    result = {
        "machine": common.machine_info(),
        "load_average": [load_before, common.load_average()],
        "app_start_s": round(app.start_seconds, 2),
        "app_start_cpu_s": round(start_cpu, 2),
        "imports_s": round(imports_s, 2),
        "imports_cpu_s": round(imports_cpu, 2),
        "app_draw_s": round(statistics.median(draw), 2),
        "app_draw_cpu_s": round(statistics.median(draw_cpu), 2),
        "one_column_in_process_s": round(statistics.median(one), 2),
        "one_column_in_process_cpu_s": round(statistics.median(one_cpu), 2),
        "repeats": args.repeats,
    }
    r = result
    rows = [
        "| measure | wall s | CPU s | baseline (same run) | wall s | CPU s | ratio (CPU) |",
        "|---|---|---|---|---|---|---|",
        f"| app start (launch -> page answers) | {r['app_start_s']} | {r['app_start_cpu_s']} | imports alone | "
        f"{r['imports_s']} | {r['imports_cpu_s']} | {r['app_start_cpu_s'] / r['imports_cpu_s']:.2f}x |",
        f"| app draw, 3 columns x 1 image, 25 decoder steps | {r['app_draw_s']} | {r['app_draw_cpu_s']} | one column "
        f"in-process | {r['one_column_in_process_s']} | {r['one_column_in_process_cpu_s']} | "
        f"{r['app_draw_cpu_s'] / r['one_column_in_process_cpu_s']:.2f}x |",
    ]
    text = "\n".join([f"CPU: {result['machine']['cpu']} ({result['machine']['cores']} cores, {args.threads} "
                      f"thread(s)); load average {load_before:.1f} -> {result['load_average'][1]:.1f}", "", *rows])
    print(text)
    out = HERE / "results"
    (out / "app-latency.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "app-latency.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
