"""The command line against the running embedded server."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest


def arserve(*args):
    return subprocess.run([sys.executable, "-m", "arserve.cli", *args], capture_output=True, text=True, timeout=300)


def test_generate_with_ngram_prints_text_and_speculative_stats(server):
    out = arserve("generate", "--target", server.target, "--speculative", "ngram", "--max-tokens", "40",
                  "Repeat exactly: the cat sat on the mat, the cat sat on the mat.")
    assert out.returncode == 0, out.stderr
    assert "cat" in out.stdout
    assert "method ngram" in out.stderr and "drafted" in out.stderr and "mean accepted length" in out.stderr


def test_stream_and_models(server):
    out = arserve("generate", "--target", server.target, "--stream", "--prompt", "The capital of France is",
                  "--max-tokens", "5")
    assert out.returncode == 0 and out.stdout.strip(), out.stderr
    out = arserve("models", "--target", server.target)
    assert "smollm2-135m-instruct (default)" in out.stdout and "ngram" in out.stdout


def test_generate_prints_logprobs_and_takes_penalties_and_ignore_eos(server, client):
    out = arserve("generate", "--target", server.target, "--stream", "--prompt", "The capital of France is",
                  "--max-tokens", "4", "--logprobs", "2", "--frequency-penalty", "0.5", "--ignore-eos")
    assert out.returncode == 0, out.stderr
    want = client.generate(prompt="The capital of France is", max_tokens=4, logprobs=2, frequency_penalty=0.5,
                           ignore_eos=True)
    assert out.stdout.startswith(want.text + "\n")  # the text, then a line a token
    lines = out.stdout[len(want.text) + 1:].splitlines()
    assert len(lines) == 4
    for line, lp in zip(lines, want.logprobs):
        assert line.startswith(f"{lp.token.decode()!r:>16} {lp.logprob:8.3f}"), line
        assert all(f"{t.token.decode()!r} {t.logprob:.3f}" in line for t in lp.top) and len(lp.top) == 2, line


def test_bad_input_exits_nonzero_with_the_status(server, capsys):
    from arserve.cli import main

    out = arserve("generate", "--target", server.target, "--prompt", "hi", "--top-p", "3")
    assert out.returncode == 1 and "INVALID_ARGUMENT" in out.stderr and "top_p" in out.stderr
    for argv, says in ((["--prompt", "x", "hi"], "not both"), ([], "a message or --prompt")):  # it dropped "hi"
        with pytest.raises(SystemExit) as e:
            main(["generate", "--target", server.target, *argv])
        assert e.value.code == 2 and says in capsys.readouterr().err


def test_image_writes_a_grid_and_reports_bad_labels(server, tmp_path):
    from PIL import Image

    grid = tmp_path / "sevens.png"
    out = arserve("image", "--target", server.target, "--label", "7", "-n", "6", "--batch", "4", "--seed", "1",
                  "--steps", "10", "-o", str(grid))
    assert out.returncode == 0, out.stderr
    assert f"wrote 6 images to {grid}" in out.stdout and "method none" in out.stdout
    assert Image.open(grid).size == (3 * 65 + 1, 2 * 65 + 1)  # 3 x 2 cells of 8 x 8 pixels at scale 8, 1-pixel gaps
    out = arserve("image", "--target", server.target, "--label", "7", "-n", "2", "--steps", "10", "--seed", "1",
                  "--speculative", "draft_model", "--no-adaptive", "-o", str(tmp_path / "cspd.png"))
    assert out.returncode == 0 and "method draft_model" in out.stdout, out.stderr
    assert int(out.stdout.split("drafted ")[1].split(",")[0]) > 0  # every round drafts: the digits pair's adaptive
    # default would decode plainly
    out = arserve("image", "--target", server.target, "--label", "12", "-o", str(tmp_path / "x.png"))
    assert out.returncode == 1 and "INVALID_ARGUMENT" in out.stderr and "labels[0] = 12" in out.stderr


def test_serve_ray_token_reaches_the_app_args(tmp_path):
    """``arserve serve --ray --token X`` starts the application with
    ``auth_token`` X (unit level: the args it would start; no Ray)."""
    from pathlib import Path

    from arserve.cli import parser, ray_app_args

    args, port = ray_app_args(parser().parse_args(["serve", "--ray", "--token", "s3cret"]))
    assert args.auth_token == "s3cret" and port == 9000
    args, _ = ray_app_args(parser().parse_args(["serve", "--ray", "--token", "env:MY_TOKEN"]))
    assert args.auth_token == "env:MY_TOKEN"
    args, _ = ray_app_args(parser().parse_args(["serve", "--ray"]))
    assert args.auth_token is None

    # With --config, the flag wins over the config's auth_token.
    config = Path(__file__).resolve().parents[1] / "deploy" / "serve_config.yaml"
    from_config, _ = ray_app_args(parser().parse_args(["serve", "--config", str(config)]))
    args, _ = ray_app_args(parser().parse_args(["serve", "--config", str(config), "--token", "s3cret"]))
    assert args.auth_token == "s3cret"
    assert args.model_dump(exclude={"auth_token"}) == from_config.model_dump(exclude={"auth_token"})


def test_serve_ray_image_model_reaches_the_app_args():
    """``arserve serve --ray --image-model digits-l`` serves that pair with its cost model (no Ray)."""
    from arserve.cli import parser, ray_app_args

    args, _ = ray_app_args(parser().parse_args(["serve", "--ray"]))
    assert [m.id for m in args.image_models] == ["digits-mar"]
    args, _ = ray_app_args(parser().parse_args(["serve", "--ray", "--image-model", "digits-l"]))
    (pair,) = args.image_models
    assert (pair.id, pair.checkpoint, pair.draft_checkpoint) == ("digits-l", "digits-l", "digits-l-draft")
    from arserve.settings import ImageModelSettings
    assert pair.round_costs_batch1 != ImageModelSettings().round_costs_batch1  # its own cost model


def test_client_and_checkpoint_failures_are_one_line(tmp_path, monkeypatch, capsys):
    """`arserve models` against no server, and training a draft before its
    teacher, ended in tracebacks."""
    from arserve import checkpoint_files
    from arserve.cli import main

    monkeypatch.setattr(checkpoint_files, "LOCAL_DIR", tmp_path)
    for argv, message in ((["models", "--target", "127.0.0.1:1", "--timeout", "2"], "error: UNAVAILABLE"),
                          (["train", "digits-l-draft", "--steps", "1", "--out", str(tmp_path / "d.safetensors")],
                           "digits-l.safetensors does not exist; `arserve train digits-l` makes it")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 1 and message in err and "Traceback" not in err, err


def test_train_refuses_a_teacher_for_a_target():
    from arserve.cli import parser

    args = parser().parse_args(["train", "digits-l", "--teacher", "digits"])
    with pytest.raises(SystemExit, match="digits-l is a target"):
        args.func(args)


@pytest.mark.parametrize("argv,code,message", [
    (["--label", "x"], 2, "argument --label: 'x': labels are integers"),
    (["--label", ""], 2, "argument --label: '' names no label"),
    (["-n", "0"], 2, "argument -n: must be at least 1, got 0"),
    (["--batch", "-1"], 2, "argument --batch: must be at least 1, got -1"),
    (["-o", "{tmp}"], 1, "is a directory; name a .png file"),
    (["-o", "{tmp}/grid.jpg"], 1, "the grid is written as PNG"),
    (["-o", "/proc/arserve/grid.png"], 1, "cannot create its directory"),
    (["--label", "1,,2"], 2, "argument --label: '1,,2' has an empty label"),  # the empty item was dropped
    (["--timeout", "0"], 2, "argument --timeout: must be a positive number of seconds, got 0"),  # failed every call
    (["--timeout", "nan"], 2, "argument --timeout: must be a positive number of seconds, got nan"),
], ids=["label-x", "label-empty", "n-0", "batch-negative", "output-dir", "output-jpg", "output-unwritable",
        "label-empty-item", "timeout-0", "timeout-nan"])
def test_image_arguments_are_checked_before_any_image_is_generated(argv, code, message, tmp_path, capsys):
    """One line on stderr and an exit status, never a traceback (nothing listens at the target: nothing is sent)."""
    from arserve.cli import main

    with pytest.raises(SystemExit) as e:
        main(["image", "--target", "127.0.0.1:1", "--timeout", "5"] + [a.format(tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err
    assert e.value.code == code and message in err and "Traceback" not in err, err


def test_a_missing_ca_file_is_one_line(tmp_path, capsys):
    """And a --ca that is no certificate (a key file: eight lines of gRPC's
    C-core log, then UNAVAILABLE), and a --token metadata cannot carry."""
    from arserve.cli import main

    (tmp_path / "key.pem").write_text("-----BEGIN PRIVATE KEY-----\nMIGHAgEA\n-----END PRIVATE KEY-----\n")
    for argv, says in ((["--ca", str(tmp_path / "nowhere.pem")], f"error: --ca {tmp_path / 'nowhere.pem'}: No such file"),
                       (["--ca", str(tmp_path / "key.pem")], f"error: --ca {tmp_path / 'key.pem'}: not a PEM certificate"),
                       (["--token", "two words"], "error: --token: a bearer token is printable ASCII")):
        with pytest.raises(SystemExit) as e:
            main(["models", "--target", "127.0.0.1:1", *argv])
        err = capsys.readouterr().err
        assert e.value.code == 1 and says in err and len(err.splitlines()) == 1, err


@pytest.fixture
def listener():
    """A port something else already listens on."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.mark.parametrize("argv,message", [
    (["--port", "-1"], "error: port: Input should be greater than or equal to 0"),
    (["--tls-cert", "{tmp}/x.pem"], "error: tls_cert_file and tls_key_file go together"),
    (["--tls-cert", "{tmp}/x.pem", "--tls-key", "{tmp}/x.pem"], "are not a PEM certificate chain and its private key"),
    (["--port", "50093", "--http-port", "50093"], "error: http_port and port are both 50093"),
    (["--port", "{busy}"], "error: --port {busy}: cannot listen on 127.0.0.1:{busy} (Address already in use)"),
    (["--port", "0", "--http-port", "{busy}"], "error: --http-port {busy}: cannot listen"),
    (["--port", "50094", "--metrics-port", "50094"], "error: --metrics-port 50094: --port uses that port too"),
    (["--host", "no.such.host.invalid"], "error: --host 'no.such.host.invalid'"),
    (["--model", "{tmp}/x.pem"], "x.pem is not a GGUF file (it starts b'not '"),
    (["--model", "{tmp}/none.gguf"], "error: model 'smollm2-135m-instruct': source"),
    (["--device", "cuda"], "torch.cuda.is_available() is False"),
    (["--config", "{tmp}/none.yaml"], "none.yaml: No such file or directory"),
    (["--config", "{tmp}/bad.yaml"], "bad.yaml: not valid YAML: "),
    (["--image-model", "digits-l"], "{tmp}/digits-l.safetensors does not exist; `arserve train digits-l` makes it"),
    pytest.param(["--engine", "vllm"], "error: vLLM is not installed: `make install-vllm`",
                 marks=pytest.mark.skipif(importlib.util.find_spec("vllm") is not None,
                                          reason="vLLM is installed here: the server would start")),
], ids=["port", "tls-half", "tls-not-pem", "http-port-is-port", "port-busy", "http-port-busy", "metrics-port-twice",
        "host", "model-not-gguf", "model-missing", "no-gpu", "config-missing", "config-not-yaml", "image-untrained",
        "vllm-not-installed"])
def test_serve_refuses_a_bad_setting_in_one_line_before_loading_anything(argv, message, tmp_path, listener, capsys,
                                                                         monkeypatch):
    from arserve import checkpoint_files
    from arserve.cli import main

    monkeypatch.setattr(checkpoint_files, "LOCAL_DIR", tmp_path)  # where `arserve train digits-l` would write

    (tmp_path / "x.pem").write_text("not a certificate\n")
    (tmp_path / "bad.yaml").write_text("applications: [\n")
    fill = dict(tmp=tmp_path, busy=listener)
    with pytest.raises(SystemExit) as e:
        main(["serve"] + [a.format(**fill) for a in argv])
    err = capsys.readouterr().err
    assert e.value.code == 1 and message.format(**fill) in err and "Traceback" not in err, err


@pytest.mark.parametrize("argv,message", [
    (["--token", "env:ARSERVE_TEST_UNSET"], "error: auth_token is 'env:ARSERVE_TEST_UNSET' but the environment "
                                            "variable ARSERVE_TEST_UNSET is not set"),
    (["--metrics-port", "99999"], "error: --metrics-port 99999: a port is 0 (any free one) to 65535"),
    (["--metrics-port", "-1"], "error: --metrics-port -1: a port is 0"),
    (["--ray", "--metrics-port", "9090"], "error: --metrics-port serves the embedded server's metrics; on Ray"),
    (["--config", "deploy/serve_config.yaml", "--model", "{tmp}/x.gguf", "--dtype", "bfloat16"],
     "error: --model, --dtype: with --config the serve config's models decide these; edit deploy/serve_config.yaml"),
    (["--ray", "--model", "{tmp}/none.gguf"], "error: model 'smollm2-135m-instruct': source"),
    (["--ray", "--token", "env:ARSERVE_TEST_UNSET"], "the environment variable ARSERVE_TEST_UNSET is not set"),
    (["--ray", "--port", "{busy}"], "error: --port {busy}: cannot listen on 127.0.0.1:{busy}"),
    (["--metrics-port", "0"], "error: --metrics-port 0: name the port"),
    (["--ray", "--http-port", "0"], "error: --http-port 0: name the port with --ray"),
    (["--ray", "--tls-cert", "{tmp}/x.pem"], "error: --tls-cert and --tls-key go together"),
    (["--config", "{tmp}/busy-http.yaml"], "error: {tmp}/busy-http.yaml: http_options.port {busy}: cannot listen"),
    (["--config", "{tmp}/other-host.yaml"], "cannot listen on 192.0.2.1:"),  # the config's host, not 127.0.0.1
], ids=["token-env-unset", "metrics-port-range", "metrics-port-negative", "ray-metrics-port", "config-and-model-flags",
        "ray-model-missing", "ray-token-env-unset", "ray-port-busy", "metrics-port-zero", "ray-http-port-zero",
        "ray-tls-half", "config-http-port-busy", "config-http-host"])
def test_serve_refuses_before_a_model_loads_or_ray_starts(argv, message, tmp_path, listener, capsys, monkeypatch):
    """The probe of docs/operating.md found these reported only after the
    models loaded (an unset env: token), never (a metrics port out of range:
    the server ran on without metrics; --metrics-port or model flags that
    --ray/--config ignore), or by Ray 48 s later in a traceback that named no
    path (a missing model on --ray); a serve config's HTTP port was not read.
    """
    from arserve import embedded
    from arserve.cli import main
    from arserve.rayserve import run

    monkeypatch.chdir(Path(__file__).parents[1])
    monkeypatch.delenv("ARSERVE_TEST_UNSET", raising=False)
    monkeypatch.setattr(embedded, "build", lambda *_: pytest.fail("the models loaded before the check"))
    monkeypatch.setattr(run.RayServer, "start", lambda *_: pytest.fail("Ray started before the check"))
    config = Path("deploy/serve_config.yaml").read_text()
    assert "  port: 8000\n" in config and "  port: 9000\n" in config
    (tmp_path / "busy-http.yaml").write_text(config.replace("  port: 8000\n", f"  port: {listener}\n")
                                             .replace("  port: 9000\n", f"  port: {run.free_port()}\n"))
    assert "  host: 127.0.0.1\n" in config
    (tmp_path / "other-host.yaml").write_text(config.replace("  host: 127.0.0.1\n", "  host: 192.0.2.1\n"))
    with pytest.raises(SystemExit) as e:
        main(["serve"] + [a.format(tmp=tmp_path, busy=listener) for a in argv])
    err = capsys.readouterr().err
    assert e.value.code == 1 and message.format(tmp=tmp_path, busy=listener) in err and "Traceback" not in err, err


def test_serve_drains_on_sigterm_finishing_what_runs_and_refusing_what_comes(tmp_path):
    """`arserve serve` as Kubernetes and `docker stop` end it: SIGTERM. It
    died at once, cutting every stream (UNAVAILABLE "Socket closed"). Now
    the stream running finishes, a new request is refused, and the process
    exits 0."""
    import signal
    import socket
    import time

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from arserve_client import Client

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "arserve.cli", "serve", "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.time() + 240
        while True:
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "serve.log").read_text()
            try:
                if health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == health_pb2.HealthCheckResponse.SERVING:
                    break
            except grpc.RpcError:
                time.sleep(0.5)
        with Client(f"127.0.0.1:{port}", timeout=120) as client:
            chunks = client.stream(prompt="Count: 1, 2, 3,", max_tokens=48)
            tokens = list(next(chunks).token_ids)
            proc.send_signal(signal.SIGTERM)
            for chunk in chunks:
                tokens += chunk.token_ids
            assert chunk.finish_reason == "length" and len(tokens) == 48
        with pytest.raises(Exception, match="UNAVAILABLE|Unavailable|unavailable"):
            with Client(f"127.0.0.1:{port}", timeout=10, retries=0) as late:
                late.generate(prompt="Hi", max_tokens=4)
        assert proc.wait(timeout=30) == 0
        assert "SIGTERM: stopping" in (tmp_path / "serve.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()


def test_training_a_drafter_without_its_data_names_the_command_that_writes_it(tmp_path, capsys):
    """It ended in a traceback, and --data did not exist: data written with
    `smollm2-data --out X`, or from another directory, could not be used."""
    from arserve.cli import main

    data = tmp_path / "none.safetensors"
    with pytest.raises(SystemExit) as e:
        main(["train", "smollm2-heads", "--data", str(data), "--steps", "1"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "Traceback" not in err, err
    assert f"error: training data {data.resolve()} does not exist: `arserve train smollm2-data --out {data}` writes it" in err


def test_a_missing_checkpoint_path_of_the_users_own_gets_no_train_command(tmp_path, capsys):
    """`--teacher /x/missing.safetensors` was told "`arserve train missing`
    makes it": a name no command knows (a named checkpoint keeps its advice:
    the image-untrained case above)."""
    from arserve.cli import main

    teacher = tmp_path / "missing.safetensors"
    with pytest.raises(SystemExit) as e:
        main(["train", "digits-draft", "--teacher", str(teacher), "--steps", "1", "--out", str(tmp_path / "d.st")])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.strip() == f"error: image checkpoint {teacher} does not exist", err
