"""Run a built treespec image without a container runtime and check that it serves.

What `docker run` would do, done by hand (root needed): a container is created from the image and its
root filesystem mounted (``podman create`` + ``podman mount``); /proc, /sys and /dev are mounted into
it; the image's own command runs there with chroot, as the image's user, with the image's
environment and working directory, in a network namespace of its own that has only loopback (so the
server is offline by construction and port 8000 clashes with nothing). From the host, inside that
namespace (nsenter), the checks are: the server process is not root; ``/health`` answers 200; a
greedy chat completion returns text; ``/metrics`` shows the generated tokens and the speculation
series; the image's HEALTHCHECK command (run in the chroot as the image's user) exits 0, and exits
non-zero once the server is stopped; SIGTERM stops the server cleanly. Mounts, the network
namespace's processes and the container are removed afterwards, also on failure.

Usage: python3 deploy/image_run.py --podman "podman --storage-driver vfs ..." --image IMAGE
Standard library only (runs with the host's python3).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

CLIENT = r"""
import json, sys, time, urllib.request, urllib.error
base = "http://127.0.0.1:%(port)d"
deadline = time.time() + %(startup)d
while True:
    try:
        with urllib.request.urlopen(base + "/health", timeout=5) as r:
            if r.status == 200:
                print("health:", r.status, r.read().decode()[:200]); break
    except (urllib.error.URLError, ConnectionError, OSError):
        pass
    if time.time() > deadline:
        sys.exit("server not healthy after %(startup)d s")
    time.sleep(2)
with urllib.request.urlopen(base + "/v1/models", timeout=30) as r:
    models = json.load(r)
model = models["data"][0]["id"]
body = json.dumps({"model": model, "temperature": 0, "max_tokens": 24,
                   "messages": [{"role": "user", "content": "What is the capital of France?"}]}).encode()
req = urllib.request.Request(base + "/v1/chat/completions", data=body,
                             headers={"content-type": "application/json"})
t0 = time.time()
with urllib.request.urlopen(req, timeout=300) as r:
    out = json.load(r)
text = out["choices"][0]["message"]["content"]
print("chat (%%.1f s, model %%s): %%r" %% (time.time() - t0, model, text))
assert text.strip(), out
assert out["usage"]["completion_tokens"] > 0, out
with urllib.request.urlopen(base + "/metrics", timeout=30) as r:
    metrics = r.read().decode()
values = {}
for line in metrics.splitlines():
    if line and not line.startswith("#"):
        name, _, value = line.rpartition(" ")
        values[name] = float(value)
generated = sum(v for k, v in values.items() if k.startswith("treespec_generation_tokens_total"))
print("metrics: %%d series, generation_tokens_total %%g" %% (len(values), generated))
assert generated >= out["usage"]["completion_tokens"], generated
for family in ("treespec_spec_accepted_length_bucket", "treespec_spec_mean_acceptance_length",
               "treespec_spec_budget", "treespec_kv_cache_usage_ratio",
               "treespec_time_to_first_token_seconds_bucket"):
    assert any(k.startswith(family) for k in values), family + " missing from /metrics"
print("client checks passed")
"""


def sh(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, text=True, **kw)


def out(cmd: list[str]) -> str:
    return sh(cmd, stdout=subprocess.PIPE).stdout.strip()


def lookup_user(rootfs: Path, user: str) -> tuple[int, int]:
    """uid:gid of ``user`` (name, uid, or name:group) from the image's own /etc/passwd."""
    name = user.split(":")[0]
    for line in (rootfs / "etc/passwd").read_text().splitlines():
        fields = line.split(":")
        if name in (fields[0], fields[2]):
            return int(fields[2]), int(fields[3])
    raise SystemExit(f"user {user!r} not in the image's /etc/passwd")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--podman", required=True, help="podman command line (storage options included)")
    ap.add_argument("--image", required=True)
    ap.add_argument("--startup-timeout", type=int, default=900, help="seconds to wait for /health")
    ap.add_argument("--expect-cpu-torch", action="store_true",
                    help="fail unless torch is a +cpu build and no nvidia-* packages are installed")
    args = ap.parse_args()
    podman = shlex.split(args.podman)

    info = json.loads(out([*podman, "image", "inspect", args.image]))[0]
    config = info["Config"]
    user = config.get("User") or ""
    # Docker-format images: podman reports the HEALTHCHECK beside Config (docker inspect: inside it).
    health = (info.get("Healthcheck") or config.get("Healthcheck") or {}).get("Test") or []
    print(f"image config: user={user!r} workdir={config.get('WorkingDir')!r} cmd={config.get('Cmd')} "
          f"healthcheck={health}")
    if not user or user in ("root", "0"):
        raise SystemExit("the image runs as root")
    if not health or health[0] != "CMD":
        raise SystemExit(f"the image has no exec-form HEALTHCHECK: {health}")

    container = out([*podman, "create", "--health-cmd", "none", args.image])  # no systemd timer
    mounts: list[Path] = []
    server = None
    try:
        rootfs = Path(out([*podman, "mount", container]))
        uid, gid = lookup_user(rootfs, user)
        dists = [p.name for p in rootfs.glob("opt/venv/lib/python3*/site-packages/*.dist-info")]
        torch_dist = [d for d in dists if d.startswith("torch-")]
        nvidia = [d for d in dists if d.lower().startswith("nvidia")]
        print(f"packages: {torch_dist}, {len(nvidia)} nvidia-* ({len(dists)} in all)")
        if args.expect_cpu_torch and (nvidia or not any("+cpu" in d for d in torch_dist)):
            raise SystemExit("expected the CPU torch wheel and no CUDA packages")
        print(f"rootfs {rootfs}; user {user} = {uid}:{gid}")
        for kind, target, opts in (("proc", "proc", []), ("sysfs", "sys", ["-o", "ro"])):
            sh(["mount", "-t", kind, *opts, kind, str(rootfs / target)])
            mounts.append(rootfs / target)
        sh(["mount", "--rbind", "/dev", str(rootfs / "dev")])
        sh(["mount", "--make-rslave", str(rootfs / "dev")])
        mounts.append(rootfs / "dev")

        env = config.get("Env") or []
        workdir = config.get("WorkingDir") or "/"
        in_chroot = ["chroot", f"--userspec={uid}:{gid}", str(rootfs),
                     "/usr/bin/env", "-i", f"--chdir={workdir}", *env]
        cmd = [*(config.get("Entrypoint") or []), *(config.get("Cmd") or [])]
        # A network namespace with only loopback up: no route out, and the image's port 8000 is free.
        script = "ip link set lo up && exec " + shlex.join([*in_chroot, *cmd])
        started = time.time()
        server = subprocess.Popen(["unshare", "--net", "--", "sh", "-c", script])
        netns = ["nsenter", f"--net=/proc/{server.pid}/ns/net", "--"]

        time.sleep(3)
        if server.poll() is not None:
            raise SystemExit(f"server exited at once with {server.returncode}")
        status = Path(f"/proc/{server.pid}/status").read_text()
        uids = next(line.split()[1:] for line in status.splitlines() if line.startswith("Uid:"))
        print(f"server pid {server.pid}: {Path(f'/proc/{server.pid}/cmdline').read_text().split(chr(0))[:3]}"
              f" uid {uids}")
        if any(int(u) == 0 for u in uids) or int(uids[0]) != uid:
            raise SystemExit(f"server runs with uids {uids}, expected {uid}")
        routes = out([*netns, "ip", "-o", "link"])
        print("links in the server's namespace:", [r.split(":")[1].strip() for r in routes.splitlines()])

        client = CLIENT % {"port": 8000, "startup": args.startup_timeout}
        sh([*netns, sys.executable, "-c", client])
        print(f"served a chat completion {time.time() - started:.0f} s after start")

        probe = [*netns, *in_chroot, *health[1:]]
        rc = subprocess.run(probe, check=False).returncode
        print(f"HEALTHCHECK while serving: exit {rc}")
        if rc != 0:
            raise SystemExit("the image's HEALTHCHECK failed against a healthy server")

        server.terminate()  # SIGTERM: the server drains and exits
        code = server.wait(timeout=120)
        print(f"server exited with {code} after SIGTERM")
        server = None
        if code != 0:
            raise SystemExit(f"server exit status {code} after SIGTERM")
        # The namespace is gone with its last process; probe with a fresh one: nothing listens.
        rc = subprocess.run(["unshare", "--net", "--", "sh", "-c",
                             "ip link set lo up && exec " + shlex.join([*in_chroot, *health[1:]])],
                            check=False, stderr=subprocess.DEVNULL).returncode
        print(f"HEALTHCHECK with no server: exit {rc}")
        if rc == 0:
            raise SystemExit("the HEALTHCHECK passes with no server: it checks nothing")
        print("image run checks passed")
        return 0
    finally:
        if server is not None and server.poll() is None:
            server.kill()
            server.wait()
        for path in reversed(mounts):
            subprocess.run(["umount", "-R", "-l", str(path)], check=False)
        subprocess.run([*podman, "umount", container], check=False, stdout=subprocess.DEVNULL)
        subprocess.run([*podman, "rm", "-f", container], check=False, stdout=subprocess.DEVNULL)


if __name__ == "__main__":
    sys.exit(main())
