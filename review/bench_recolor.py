"""How fast a curator's second recolour is: ``python -m review.bench_recolor [--json F]``.

Colourises one small item with the tiny random bundle (``diffcolor run``),
starts a real ``diffcolor review`` server on 127.0.0.1 and asks its JSON API
to recolour that item twice, each time waiting for the job to end. The first
job pays for what the server starts once (its Prefect server, its worker's
models); the second runs on what the first left warm. Prints the seconds of
each job, from the request to the job's end, and their ratio (the goal is at
most 0.2); ``--json PATH`` writes them too. ``--keep-warm 0`` measures the
server without warm workers (every job loads its models).
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def _prepare(folder: Path, environment: dict) -> Path:
    """A one-item collection colourised with the tiny bundle (the smoke preset, on the CPU); returns its output."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (folder / "images").mkdir()
    ramp = np.tile(np.linspace(30, 220, 64), (48, 1)).astype(np.uint8)
    Image.fromarray(ramp, mode="L").save(folder / "images" / "p0.png")
    pq.write_table(pa.table({"item_id": ["p0"], "image_uri": ["images/p0.png"], "caption": ["a dog on a bench"],
                             "seed": [0]}), folder / "manifest.parquet")
    subprocess.run([sys.executable, "-m", "diffcolor", "run", "manifest.parquet", "--out", "out", "--model", "tiny",
                    "--preset", "smoke", "--device", "cpu", "--pool", "inline"], cwd=folder, env=environment,
                   check=True, stdout=subprocess.DEVNULL)
    return folder / "out"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def measure(keep_warm: float | None = None, timeout: float = 900.0) -> dict:
    """The seconds of the first and the second recolour of one item through a real review server."""
    import httpx

    environment = {name: value for name, value in os.environ.items() if not name.startswith("PREFECT_")}
    with tempfile.TemporaryDirectory(prefix="diffcolor-bench-recolor-") as folder:
        folder = Path(folder)
        out = _prepare(folder, environment)
        token, port = "b" * 32, _free_port()
        (folder / "token").write_text(token)
        command = [sys.executable, "-m", "diffcolor", "review", str(out), "--port", str(port), "--token-file",
                   str(folder / "token"), "--device", "cpu"]
        if keep_warm is not None:
            command += ["--keep-warm", str(keep_warm)]
        stderr = (folder / "stderr").open("w")
        server = subprocess.Popen(command, cwd=folder, env=environment, stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=stderr)
        csrf = hmac.new(token.encode(), b"diffcolor-review-csrf", hashlib.sha256).hexdigest()
        api = httpx.Client(base_url=f"http://127.0.0.1:{port}/api", timeout=timeout,
                           headers={"Authorization": f"Bearer {token}", "X-CSRF-Token": csrf})
        try:
            deadline = time.monotonic() + 300
            while True:
                try:
                    api.get("/items")
                    break
                except httpx.TransportError:
                    if server.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError("the review server did not start: "
                                           + (folder / "stderr").read_text()[-2000:]) from None
                    time.sleep(0.2)
            seconds = []
            for colour in ("red", "blue"):
                start = time.perf_counter()
                job = api.post("/recolor", json={"targets": [{"item_id": "p0", "color_map": {"dog": colour}}]}).json()
                while (state := api.get(f"/jobs/{job['job_id']}").json())["state"] not in ("completed", "failed"):
                    if time.perf_counter() - start > timeout:
                        raise RuntimeError(f"recolour job {job['job_id']} did not end in {timeout} s")
                    time.sleep(0.05)
                if state["state"] != "completed":
                    raise RuntimeError(f"recolour job failed: {state['message']}")
                seconds.append(time.perf_counter() - start)
        finally:
            server.terminate()
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
            stderr.close()
    return {"first_seconds": round(seconds[0], 3), "second_seconds": round(seconds[1], 3),
            "ratio": round(seconds[1] / seconds[0], 3), "goal_ratio": 0.2, "keep_warm": keep_warm,
            "model": "tiny", "device": "cpu", "cpus": os.cpu_count()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m review.bench_recolor", description=__doc__.splitlines()[0])
    parser.add_argument("--keep-warm", type=float, default=None, metavar="SECONDS",
                        help="the review server's --keep-warm (default: the server's own default)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    figures = measure(args.keep_warm)
    print(f"first recolour {figures['first_seconds']:.2f} s, second {figures['second_seconds']:.2f} s, "
          f"ratio {figures['ratio']:.3f} (goal <= {figures['goal_ratio']})")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
