"""A local collaborator lives no longer than the envoy that started it.

The envoy passes its PID in FEDKUBE_ENVOY_PID; the collaborator asks the kernel to
SIGKILL it when that parent dies (PR_SET_PDEATHSIG), even by SIGKILL. Set here, at the
collaborator's start, rather than by the envoy between fork and exec (`preexec_fn`): that
runs Python in a forked copy of a process with gRPC's threads, which broke envoys.
"""

from __future__ import annotations

import os
import signal
import sys

from fedkube.api.environment import ENVOY_PID

_PR_SET_PDEATHSIG = 1


def bind_to_envoy() -> None:
    """Dies with the envoy named in the environment; exits now if it is already gone."""
    envoy = os.environ.get(ENVOY_PID)
    if not envoy or not sys.platform.startswith("linux"):
        return
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != int(envoy):  # the envoy died before the request took effect
        raise SystemExit(f"envoy {envoy} is gone; not starting")
