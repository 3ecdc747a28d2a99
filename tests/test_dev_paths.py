"""The developer tools find the repository's build scripts (they moved with fedkube.dev)."""

from __future__ import annotations

from fedkube.dev import cluster, node


def test_the_build_scripts_the_dev_tools_run_exist() -> None:
    for script in (cluster.BUILD_SCRIPT, node.NODE_BUILD_SCRIPT, node.IMAGE_BUILD_SCRIPT,
                   node.HOST_PACKAGES_SCRIPT):
        assert script.is_file(), script
