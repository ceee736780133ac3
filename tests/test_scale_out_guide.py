"""docs/scale-out.md and the multi-node configs agree with the code: node numbering (one source: the dry-run
plan's `layout:`), the install line (never the unrelated `torchspec` name on the public index), the 2-node
config's store protocol."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _nodes(spec: str) -> list[int]:
    a, _, b = spec.partition("-")
    return list(range(int(a), int(b or a) + 1))


def _roles(lines) -> dict[int, set[str]]:
    """node -> {"trainer", "engine"} from lines such as `node 0 (driver): trainer ranks 0-7` or `nodes 1-2  one
    SGLang engine`."""
    out: dict[int, set[str]] = {}
    for line in lines:
        m = re.match(r"#?\s*nodes? (\d+(?:-\d+)?)\b(.*)", line)
        if m:
            roles = {r for r in ("trainer", "engine") if r in m.group(2)}
            for n in _nodes(m.group(1)):
                out.setdefault(n, set()).update(roles)
    return out


@pytest.mark.parametrize("name", ["sglang_kimi_k25_2node", "sglang_kimi_k25_3node"])
def test_config_comments_and_readme_number_nodes_as_the_plan(name):
    from torchspec.config.loader import load_config
    from torchspec.config.plan import make_plan, node_layout

    path = ROOT / "configs" / f"{name}.yaml"
    cfg = load_config([path], ["inference.launcher=ray", "inference.store=mooncake",
                               "mooncake.master_server_address=10.0.0.1:50051"])
    plan = _roles(node_layout(cfg, make_plan(cfg)))
    assert plan[0] == {"trainer"}   # the driver's node
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    assert _roles(header) == plan
    [row] = [ln for ln in (ROOT / "configs" / "README.md").read_text().splitlines()
             if ln.startswith(f"| `{name}.yaml`")]
    said = {n: {r} for r, spec in re.findall(r"(trainer|engine)\S* \S*\s*(?:\w+ )*?(?:on|over) nodes? (\d+(?:-\d+)?)",
                                                row) for n in _nodes(spec)}
    assert said == plan, row


def test_two_node_config_uses_the_protocol_that_was_run():
    from torchspec.config.loader import load_config

    cfg = load_config([ROOT / "configs" / "sglang_kimi_k25_2node.yaml"], [])
    assert cfg.mooncake.protocol == "tcp"


def test_install_lines_never_name_the_public_torchspec_package():
    """Installing the bare name would fetch the unrelated placeholder of that name on the public index: every
    install line in the guide, README and the multi-node configs installs the repository itself (the whole
    repository is scanned by tests/test_install_hints.py)."""
    files = [ROOT / "README.md", ROOT / "docs" / "scale-out.md", *sorted((ROOT / "configs").glob("*.yaml"))]
    bad = [f"{f.name}: {ln.strip()}" for f in files for ln in f.read_text().splitlines()
           if re.search(r"pip install ['\"]?torchspec\b", ln) and "@ git+" not in ln]   # a git URL is the repository
    assert bad == []
    guide = (ROOT / "docs" / "scale-out.md").read_text()
    assert "pip install -e '.[ray,mooncake]'" in guide and "mooncake-cpu" in guide
    assert "mooncake-cpu" in (ROOT / "pyproject.toml").read_text()


def test_why_the_rehearsal_is_not_two_ray_start_commands(tmp_path):
    """Section 6 says Ray's CLI cannot put a second node on 127.0.0.1; this holds the two reasons to the installed
    Ray, so the guide is revisited when a Ray release lifts them. Nothing connects anywhere: the first command
    stops before any connection, the second is Ray's address rule read without a network call."""
    import os
    import shutil
    import subprocess

    pytest.importorskip("ray", reason="ray is not installed (pip install -e '.[ray]')")
    ray_cli = shutil.which("ray")
    if ray_cli is None:
        pytest.skip("the ray command is not on PATH")
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    r = subprocess.run([ray_cli, "start", "--address=127.0.0.1:9", "--num-cpus=1", f"--temp-dir={tmp_path}"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode != 0 and "Multi-node Ray clusters are not supported" in r.stdout + r.stderr

    from ray._common.network_utils import node_ip_address_from_perspective
    from ray._private import ray_constants, services

    routable = node_ip_address_from_perspective(None)
    if routable.startswith("127."):
        pytest.skip("this machine has no routable IP: Ray has nothing to rewrite 127.0.0.1 to")
    saved, ray_constants.ENABLE_RAY_CLUSTER = ray_constants.ENABLE_RAY_CLUSTER, True   # a non-head node's mode
    try:
        assert services.resolve_ip_for_localhost("127.0.0.1") == routable
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved
    guide = (ROOT / "docs" / "scale-out.md").read_text()
    assert "Multi-node Ray clusters are not supported" in guide and "RAY_AUTH_MODE=token" in guide
