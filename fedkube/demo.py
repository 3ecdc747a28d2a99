"""`fedkube demo`: a whole federation on this machine, each part a real process.

A director and N envoys (each guarding a shard of scikit-learn's digits) start as separate
`fedkube` processes on loopback; the demo shows the director's registry as it fills.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.live import Live

from fedkube.client import DirectorClient, EnvoyView
from fedkube.local import Process, director_process, envoy_process, free_port, wait_for
from fedkube.ui import shards_table

console = Console(stderr=True)


def _registry(port: int) -> list[EnvoyView]:
    try:
        with DirectorClient(f"localhost:{port}", timeout=2) as client:
            return client.envoys()
    except Exception:  # the director is still starting
        return []


def run_demo(*, envoys: int, rounds: int, non_iid: bool, out_dir: Path, as_json: bool) -> int:
    started = time.monotonic()
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fedkube-demo-") as tmp:
        work, port = Path(tmp), free_port()
        processes: list[Process] = [director_process(work, port, period=2.0).start()]
        names = [f"envoy-{i + 1}" for i in range(envoys)]
        extra = ["--shard-option", "non_iid=true"] if non_iid else []
        processes += [envoy_process(work, name, port, index=i, count=envoys, extra=extra).start()
                      for i, name in enumerate(names)]
        try:
            with Live(shards_table([]), console=console, refresh_per_second=4) as live:
                def all_online() -> bool:
                    rows = _registry(port)
                    live.update(shards_table(rows))
                    return len(rows) == envoys and all(r.online for r in rows)

                wait_for(all_online, timeout=120, interval=0.25, message="all envoys online")
            registry = _registry(port)
        finally:
            for process in processes:
                process.stop()
            for process in processes:
                (out_dir / f"{process.name}.log").write_text(process.output())
    summary = {"envoys": [e.name for e in registry], "online": sum(e.online for e in registry),
               "seconds": round(time.monotonic() - started, 2)}
    if as_json:
        print(json.dumps(summary))
    else:
        console.print(f"[green]{summary['online']} of {envoys} envoys online[/]; "
                      f"logs in {out_dir}")
    return 0
