"""`make image-test`: build the CPU image for real and run it, where no registry can be pulled from.

1. makes the base image the Dockerfile names (``debian:bookworm-slim``) with debootstrap from
   Debian's mirror and imports it under that name;
2. starts a private Docker engine (its own data root, socket and containerd; no bridge, no
   iptables, so it touches nothing on the host), and stops and removes it at the end;
3. builds the image with ``TORCH_VARIANT=cpu`` from the torch CPU wheel copied into ``.whl/``;
4. runs ``captionfleet demo`` in it with no network, a read-only root and all capabilities
   dropped (as the Kubernetes manifests run it);
5. runs ``captionfleet worker`` in it against a real Kafka-compatible broker on the host, waits
   for ``/readyz``, for Docker's HEALTHCHECK to say healthy, and for the caption of one request;
   then stops it with SIGTERM and expects a clean drain (exit 0).

Every step has a time limit; everything it started is stopped and removed, also on failure.
It needs root (dockerd, debootstrap): ``ops/install-image-tools.sh`` installs the Debian packages.
Nothing is skipped: if the engine cannot start here, the run fails and says why.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ops.docker_engine import DOCKER, Engine, Failed, log, run  # noqa: E402
from tests.services.kafka import FAST_GROUP, KafkaBroker, TopicReader, free_port  # noqa: E402

CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
TAG = "captionfleet:image-test"
# As the Kubernetes manifests run it: read-only root, writable /tmp and home only, no capabilities.
LOCKED_DOWN = [
    "--read-only",
    "--tmpfs", "/tmp",
    "--tmpfs", "/home/captionfleet:rw,uid=10001,gid=10001,mode=0700",
    "--cap-drop", "ALL",
    "--security-opt", "no-new-privileges",
]  # fmt: skip


@contextmanager
def step(name: str, timings: dict[str, float]) -> Iterator[None]:
    log(f"{name} ...")
    started = time.monotonic()
    yield
    timings[name] = time.monotonic() - started
    log(f"{name}: {timings[name]:.1f}s")


def dockerfile_arg(name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S+)$", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    if not match:
        raise Failed(f"the Dockerfile has no `ARG {name}=...` default; this script reads it from there")
    return match.group(1)


def debian_mirror() -> str:
    """DEBIAN_MIRROR if set, else the mirror this machine's apt uses (deb822 or one-line sources)."""
    if os.environ.get("DEBIAN_MIRROR"):
        return os.environ["DEBIAN_MIRROR"]
    for path in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        text = path.read_text(errors="replace") if path.is_file() else ""
        match = re.search(r"^(?:URIs:|deb)\s+(\S+/debian)/?\s*$", text, re.MULTILINE) or re.search(
            r"^deb\s+(?:\[[^]]*\]\s+)?(\S+/debian)\s", text, re.MULTILINE
        )
        if match:
            return match.group(1)
    raise Failed("no Debian mirror found in /etc/apt/sources.list*: set DEBIAN_MIRROR to one (…/debian)")


def check_tools() -> None:
    if os.geteuid() != 0:
        raise Failed("run as root: dockerd and debootstrap need it")
    missing = [tool for tool in ("dockerd", "debootstrap", DOCKER) if shutil.which(tool) is None]
    if missing:
        raise Failed(f"{', '.join(missing)} not found: run ops/install-image-tools.sh (Debian docker.io, debootstrap)")


def make_base_image(engine: Engine, workdir: Path, base: str) -> None:
    suite = re.fullmatch(r"debian:(\w+)(?:-slim)?", base)
    if not suite:
        raise Failed(f"BASE_IMAGE={base}: this script can only make debian:<release>[-slim] bases with debootstrap")
    rootfs = workdir / "rootfs"
    run(["debootstrap", "--variant=minbase", suite.group(1), str(rootfs), debian_mirror()], timeout=900)
    # What the official slim images drop too: apt's lists and caches, docs are kept (small).
    for junk in ("var/lib/apt/lists", "var/cache/apt/archives"):
        for path in (rootfs / junk).glob("*"):
            if path.is_file():
                path.unlink()
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "--numeric-owner", "-c", "."], stdout=subprocess.PIPE)
    try:
        engine.docker("import", "-", base, stdin=tar.stdout, timeout=300)
    finally:
        assert tar.stdout is not None
        tar.stdout.close()
        tar.wait(timeout=60)
    shutil.rmtree(rootfs, ignore_errors=True)


def torch_cpu_wheel(version: str) -> Path:
    dirs = [ROOT / ".whl", *(Path(p) for p in os.environ.get("PIP_FIND_LINKS", "").split() if p), Path("/opt/wheels")]
    for folder in dirs:
        found = sorted(folder.glob(f"torch-{version}+cpu-*.whl")) if folder.is_dir() else []
        if found:
            return found[0]
    raise Failed(
        f"no torch-{version}+cpu wheel in {', '.join(map(str, dirs))}: put one into .whl/ "
        f"(pip download 'torch=={version}' --no-deps -d .whl/ --index-url <the PyTorch CPU index>)"
    )


def shapes_picture(folder: Path) -> str:
    """One picture the built-in model knows (the demo's generator), for the worker's round trip."""
    from captionfleet.trainer.shapes import render, sample_scene

    scene = sample_scene(4242, 0)
    render(scene, 64).save(folder / "shape.png")
    return scene.caption()


def wait_http(url: str, engine: Engine, container: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        state = json.loads(engine.docker("inspect", "-f", "{{json .State}}", container))
        if not state["Running"]:
            logs = engine.logs(container)
            raise Failed(f"the worker container exited ({state['ExitCode']}) before {url} answered:\n{logs}")
        try:
            with urllib.request.urlopen(url, timeout=3) as response:
                if response.status == 200:
                    return
        except OSError as error:
            last = str(error)
        time.sleep(1)
    raise Failed(f"{url} did not answer 200 within {timeout:.0f}s (last: {last})")


def rebuild_after_code_change(engine: Engine, workdir: Path, build: list[str]) -> tuple[bool, bool]:
    """Build again from a copy of the context with one code file changed; returns (the dependency
    layer came from the cache, the project layer was rebuilt)."""
    ctx = workdir / "context"
    ctx.mkdir()
    for name in ("Dockerfile", ".dockerignore", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, ctx / name)
    # As in the real context: captionfleet/ with its links to worker/, trainer/ and dashboard/ kept as links.
    for name in ("captionfleet", "worker", "trainer", "dashboard"):
        shutil.copytree(ROOT / name, ctx / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    (ctx / "ops").mkdir()
    shutil.copy2(ROOT / "ops" / "healthcheck.py", ctx / "ops" / "healthcheck.py")
    shutil.copytree(ROOT / ".whl", ctx / ".whl", ignore=lambda _, names: [n for n in names if "torch-" not in n])
    with (ctx / "worker" / "__init__.py").open("a") as handle:
        handle.write("\n# image-test: a code change\n")
    # A tag of its own, so the image under test stays the one built from the real tree.
    cmd = [DOCKER, *build, "-t", f"{TAG}-rebuilt", "--progress", "plain", str(ctx)]
    proc = subprocess.run(
        cmd, env=engine.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900, check=False
    )
    out = proc.stdout
    if proc.returncode != 0:
        raise Failed(f"the rebuild failed ({proc.returncode}):\n{out[-6000:]}")
    steps = dict(re.findall(r"^(#\d+) \[[^\]]*\] (.*)$", out, re.MULTILINE))
    cached = set(re.findall(r"^(#\d+) CACHED$", out, re.MULTILINE))
    deps = [i for i, text in steps.items() if "-r requirements.txt" in text]
    project = [i for i, text in steps.items() if "--no-deps" in text]
    if not deps or not project:
        raise Failed(f"could not find the dependency and project steps in the build output:\n{out[-4000:]}")
    return all(i in cached for i in deps), not any(i in cached for i in project)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep-image", action="store_true", help="save the image to .cache/captionfleet-cpu.tar")
    args = parser.parse_args()
    # `timeout` (make image-test) sends SIGTERM: exit through the finally below, so the engine and
    # the containers are stopped and removed rather than left running.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))
    timings: dict[str, float] = {}
    started = time.monotonic()
    check_tools()
    workdir = Path(tempfile.mkdtemp(prefix="captionfleet-image-test-", dir="/var/tmp"))
    engine = Engine(workdir)
    wheel_copy: Path | None = None
    containers: list[str] = []
    try:
        with step("start docker engine", timings):
            engine.start()
        base = dockerfile_arg("BASE_IMAGE")
        with step(f"make base image {base} (debootstrap)", timings):
            make_base_image(engine, workdir, base)
        wheel_copy = stage_torch_wheel()
        build_image(engine, workdir, timings)
        with step("captionfleet demo in the image (offline, read-only root)", timings):
            run_demo(engine)
        with step("worker in the image: /readyz, HEALTHCHECK, one caption, clean drain", timings):
            run_worker(engine, workdir, containers)
        if args.keep_image:
            (ROOT / ".cache").mkdir(exist_ok=True)
            engine.docker("save", "-o", str(ROOT / ".cache" / "captionfleet-cpu.tar"), TAG, timeout=600)
    except Failed as error:
        print(f"image-test FAILED: {error}", file=sys.stderr, flush=True)
        return 1
    finally:
        log("cleaning up (engine, its data root, containers) ...")
        cleanup_started = time.monotonic()
        for name in containers:
            subprocess.run([DOCKER, "rm", "-f", name], env=engine.env, capture_output=True, timeout=60)
        engine.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        if wheel_copy is not None:
            wheel_copy.unlink(missing_ok=True)
        timings["clean up"] = time.monotonic() - cleanup_started
    timings["total"] = time.monotonic() - started
    for name, seconds in timings.items():
        log(f"{seconds:7.1f}s  {name}")
    log("passed")
    return 0


def stage_torch_wheel() -> Path | None:
    """The Dockerfile's torch CPU wheel into .whl/ (the build context); the copy made, to remove at the end."""
    wheel = torch_cpu_wheel(dockerfile_arg("TORCH_VERSION"))
    if wheel.parent == ROOT / ".whl":
        return None
    (ROOT / ".whl").mkdir(exist_ok=True)
    wheel_copy = ROOT / ".whl" / wheel.name
    try:
        shutil.copy2(wheel, wheel_copy)
    except BaseException:
        wheel_copy.unlink(missing_ok=True)  # a partial copy: main's clean-up never learns its name
        raise
    return wheel_copy


def build_image(engine: Engine, workdir: Path, timings: dict[str, float]) -> None:
    """Build the CPU image, then again after a code change: only the project layer may be rebuilt."""
    with step("build the CPU image", timings):
        build = ["build", "--network", "host", "--build-arg", "TORCH_VARIANT=cpu"]
        if Path(CA_BUNDLE).exists():  # a TLS-inspecting proxy's CA, as a secret: never in a layer
            build += ["--secret", f"id=pip-ca,src={CA_BUNDLE}"]
        engine.docker(*build, "-t", TAG, str(ROOT), timeout=1800)
    size = int(engine.docker("image", "inspect", "-f", "{{.Size}}", TAG).strip())
    log(f"image {TAG}: {size / 1e9:.2f} GB")
    with step("rebuild after a code change", timings):
        deps_cached, project_rebuilt = rebuild_after_code_change(engine, workdir, build)
        if not (deps_cached and project_rebuilt):
            raise Failed(
                f"after a code change: dependency layer cached={deps_cached}, project rebuilt={project_rebuilt}; "
                "keep the Dockerfile's dependency install before any COPY of code"
            )
        log("dependencies came from the cache; only the project layer was rebuilt")


def run_demo(engine: Engine) -> None:
    """``captionfleet demo`` in the image, with no network and the locked-down container settings."""
    out = engine.docker(
        "run", "--rm", "--network", "none", *LOCKED_DOWN, TAG, "demo", "--count", "20", "--quiet",
        timeout=600,
    )  # fmt: skip
    if "exact match:" not in out:
        raise Failed(f"the demo printed no score:\n{out}")
    log(next(line for line in out.splitlines() if line.startswith("exact match:")))


def run_worker(engine: Engine, workdir: Path, containers: list[str]) -> None:
    """``captionfleet worker`` in the image against a broker on the host: ready, healthy, one caption,
    and a clean drain on SIGTERM. The container's name goes into ``containers`` for the clean-up."""
    data = workdir / "pictures"
    data.mkdir()
    truth = shapes_picture(data)
    os.chmod(data, 0o755)
    with KafkaBroker() as broker:
        broker.create_topic("caption-requests", partitions=2)
        broker.create_topic("caption-results", partitions=1)
        broker.create_topic("caption-dead-letters", partitions=1)
        port = free_port()
        name = f"captionfleet-image-test-{os.getpid()}"
        containers.append(name)
        start_worker(engine, name, broker.bootstrap, port, data)
        wait_http(f"http://127.0.0.1:{port}/readyz", engine, name, timeout=180)
        log("/readyz answered 200")
        wait_healthy(engine, name)
        log("HEALTHCHECK: healthy")
        caption_one(engine, name, broker, truth)
        engine.docker("stop", "--time", "40", name, timeout=90)
        code = engine.docker("inspect", "-f", "{{.State.ExitCode}}", name).strip()
        if code != "0":
            logs = engine.logs(name)
            raise Failed(f"the worker exited {code} on SIGTERM, not 0 (a clean drain):\n{logs}")
        log("SIGTERM: drained and exited 0")


def start_worker(engine: Engine, name: str, bootstrap: str, port: int, data: Path) -> None:
    env = {
        "WORKER_KAFKA__BOOTSTRAP": bootstrap,
        "WORKER_KAFKA__SESSION_TIMEOUT_MS": str(FAST_GROUP["session_timeout_ms"]),
        "WORKER_KAFKA__HEARTBEAT_INTERVAL_MS": str(FAST_GROUP["heartbeat_interval_ms"]),
        "WORKER_MODEL__REF": "builtin",
        "WORKER_METRICS__PORT": str(port),
        "WORKER_FETCH__FILE_ROOT": "/data",
        "WORKER_SHUTDOWN__GRACE_S": "20",
    }
    engine.docker(
        "run", "-d", "--name", name, "--network", "host", *LOCKED_DOWN,
        "-v", f"{data}:/data:ro",
        # The image's HEALTHCHECK, run often so the test need not wait 30 s per probe.
        "--health-interval", "2s", "--health-start-period", "0s", "--health-retries", "3",
        *[arg for key, value in env.items() for arg in ("-e", f"{key}={value}")],
        TAG, "worker",
    )  # fmt: skip


def wait_healthy(engine: Engine, name: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while (health := engine.docker("inspect", "-f", "{{.State.Health.Status}}", name).strip()) != "healthy":
        if time.monotonic() > deadline:
            raise Failed(f"Docker's HEALTHCHECK says {health!r} after 60s, not healthy:\n{engine.logs(name)}")
        time.sleep(1)


def caption_one(engine: Engine, name: str, broker: KafkaBroker, truth: str) -> None:
    """One request for the shapes picture; its result must come within 90 s and carry a caption."""
    request = {"id": "smoke-1", "uri": "file:///data/shape.png"}
    broker.produce("caption-requests", [(0, b"smoke-1", json.dumps(request).encode())])
    reader = TopicReader(broker, ["caption-results", "caption-dead-letters"])
    try:
        done = reader.read_until(lambda view: bool(view.ids("caption-results") or view.ids("caption-dead-letters")), 90)
        messages = reader.messages
    finally:
        reader.close()
    if not done or not messages["caption-results"]:
        raise Failed(f"no result for the request within 90s: {messages}\n{engine.logs(name)}")
    result = messages["caption-results"][0]
    log(f"caption: {result.get('caption')!r} (truth: {truth!r})")
    if not result.get("caption"):
        raise Failed(f"the result has no caption: {result}")


if __name__ == "__main__":
    sys.exit(main())
