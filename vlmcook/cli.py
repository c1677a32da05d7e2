"""`vlmcook <command>`: a table of commands, each a plain function; heavy imports happen inside the command.

`chat` prints the answer on stdout and everything else (reasoning with --think, --stats, REPL notices) on stderr,
so `vlmcook chat "q" > answer.txt` keeps just the answer.

`main` is the error boundary of every command: bad input (a `ValueError` or `OSError`, which name what was wrong,
and bad flags) is one line on stderr and exit code 2; anything else is a bug, reported in one line with exit code 1;
`VLMCOOK_DEBUG=1` shows the traceback instead (docs/reliability.md, "Command line").
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DEFAULT_MODEL = "runs/demo/model"  # what `make demo` / `vlmcook demo` leaves behind
REPL_HELP = ("commands: /reset (new conversation, same --image/--video), /image FILE and /video FILE (attach to "
             "the next message), /quit (or Ctrl-D)")


def _recipe(name: str):
    """A script of the checkout's recipes/ folder (recipes are launched by the CLI, never imported by the library)."""
    import importlib

    root = Path(__file__).resolve().parents[1]
    if not (root / "recipes" / f"{name}.py").is_file():
        raise FileNotFoundError(f"recipes/{name}.py is not next to this vlmcook package ({root}): the demos run from "
                                f"a source checkout (git clone, then `make demo`)")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return importlib.import_module(f"recipes.{name}")


def _demo(args) -> int:
    if args.rl:  # the RL flavour: long-only vs hybrid GRPO on a toy verifiable task (reports/rl.md)
        rl = _recipe("rl_demo")
        rl.run_rl_demo(out=args.out if args.out != "runs/demo" else "runs/demo_rl", quick=args.quick, seed=args.seed)
        return 0
    _recipe("demo").run(out=args.out, seed=args.seed, quick=args.quick, steps=args.steps)
    return 0


def _info(args) -> int:
    from vlmcook.checkpoint import scan_checkpoint
    from vlmcook.config import MiniCPMVConfig

    cfg = MiniCPMVConfig.from_file(args.model)
    entries = scan_checkpoint(args.model)
    groups: dict[str, int] = {}
    for name, e in entries.items():
        n = 1
        for s in e.shape:
            n *= s
        groups[name.split(".")[0]] = groups.get(name.split(".")[0], 0) + n
    print(f"{args.model}: {len(entries)} tensors, {sum(groups.values()):,} parameters "
          f"({', '.join(f'{k} {v:,}' for k, v in groups.items())})")
    print(f"llm: {cfg.llm.num_hidden_layers} layers x {cfg.llm.hidden_size}, vocab {cfg.llm.vocab_size}; "
          f"vision: {cfg.vision.num_hidden_layers} layers x {cfg.vision.hidden_size}; "
          f"{cfg.query_num} tokens per view or video package; views of ~{cfg.scale_resolution}px, "
          f"up to {cfg.max_slice_nums} slices")
    return 0


# ---- chat -----------------------------------------------------------------------------------------------------
def _load_chat_model(args):
    """ChatModel for --model, or the demo checkpoint; a clear FileNotFoundError when there is none."""
    folder = Path(args.model or DEFAULT_MODEL)
    if not (folder / "config.json").is_file():
        if args.model:
            raise FileNotFoundError(f"--model {args.model}: no checkpoint there (expected config.json and "
                                    f"*.safetensors in the released layout)")
        raise FileNotFoundError(f"no model given and the default checkpoint {DEFAULT_MODEL} does not exist yet: "
                                f"run `make demo` (or `vlmcook demo`) to create it, or pass --model DIR")
    from vlmcook.infer.api import ChatModel

    return ChatModel.load(str(folder), dtype=args.dtype, device=args.device)


def _media(args) -> list[dict]:
    items = [{"type": "image", "image": f} for f in args.image or []]
    if args.video:
        items.append({"type": "video", "video": args.video})
    return items


def _chat_kwargs(args) -> dict:
    """The chat() arguments the flags set (video knobs apply to every video of the conversation)."""
    kw = {"thinking": args.think, "think_budget": args.think_budget, "max_new_tokens": args.max_new_tokens,
          "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
          "repetition_penalty": args.repetition_penalty, "seed": args.seed, "max_slice_nums": args.max_slice_nums,
          "fps": args.fps, "max_frames": args.max_frames, "packing": args.packing,
          "max_visual_tokens": args.max_visual_tokens}
    return {k: v for k, v in kw.items() if v is not None}


def _stream_turn(chat_model, messages: list[dict], kw: dict):
    """Print reasoning deltas to stderr and answer deltas to stdout as they come; -> the final ChatResult."""
    result, in_reasoning = None, False
    for chunk in chat_model.chat(messages, stream=True, **kw):
        if chunk.reasoning:
            if not in_reasoning:
                print("thinking: ", end="", file=sys.stderr)
            in_reasoning = True
            print(chunk.reasoning, end="", file=sys.stderr, flush=True)
        if chunk.answer:
            if in_reasoning:
                print(file=sys.stderr)
                in_reasoning = False
            print(chunk.answer, end="", flush=True)
        result = chunk.result or result
    if in_reasoning:
        print(file=sys.stderr)
    print(flush=True)
    return result


def _turn(chat_model, messages: list[dict], args) -> tuple[str, str]:
    """Generate one reply to `messages`, print it (and the stats); returns (reasoning, answer)."""
    kw = _chat_kwargs(args)
    if args.stream:
        r = _stream_turn(chat_model, messages, kw)
    else:
        r = chat_model.chat(messages, stream=False, **kw)
        if args.think or r.reasoning:
            print(f"thinking: {r.reasoning}", file=sys.stderr)
        print(r.answer, flush=True)
    if args.stats:
        _print_stats(r)
    return r.reasoning, r.answer


def _print_stats(r) -> None:
    """Token accounting of one reply: the prompt's text / visual split, each image's views and each video's
    packages with the seconds they cover, then prefill and decode speed."""
    p, v, c = r.usage.prompt_tokens, r.usage.visual_tokens, r.usage.completion_tokens
    err = sys.stderr
    print(f"[stats] prompt {p} tokens ({p - v} text + {v} visual), completion {c} tokens, finish: "
          f"{r.finish_reason}", file=err)
    for item in r.prompt.items:
        line = (f"[stats]   {item.kind} ({item.where}) {item.size[0]}x{item.size[1]}: {item.views} views -> "
                f"{item.packages} packages -> {item.visual_tokens} visual tokens")
        if item.spans:
            spans = ", ".join(f"{a:.1f}-{b:.1f}s" for a, b in item.spans[:12])
            more = f", ... ({len(item.spans)} blocks)" if len(item.spans) > 12 else ""
            line += f"; package time spans: {spans}{more}"
        print(line, file=err)
    t = r.timings
    print(f"[stats] preprocess {t.preprocess_s:.3f} s, prefill {t.prefill_s:.3f} s ({p / max(t.prefill_s, 1e-9):.1f}"
          f" tok/s), decode {t.decode_s:.3f} s ({c / max(t.decode_s, 1e-9):.1f} tok/s)", file=err)


def _attach(line: str, pending: list[dict], args) -> None:
    cmd, _, path = line.partition(" ")
    path = path.strip()
    if not path or not Path(path).is_file():
        print(f"{cmd}: no such file {path!r}", file=sys.stderr)
        return
    pending.append({"type": "image" if cmd == "/image" else "video", cmd[1:]: path})
    print(f"(attached {path} to your next message)", file=sys.stderr)


def _repl(chat_model, args) -> int:
    """Multi-turn chat on stdin lines; the media of --image/--video go with the first message."""
    tty = sys.stdin.isatty()
    history: list[dict] = []
    pending = _media(args)
    print(f"vlmcook chat: type a message; {REPL_HELP}", file=sys.stderr)
    while True:
        if tty:
            print("you> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() in ("/quit", "/exit"):
            return 0
        line = line.strip()
        if not line:
            continue
        if line == "/reset":
            history, pending = [], _media(args)
            print("(new conversation)", file=sys.stderr)
        elif line.startswith(("/image ", "/video ")):
            _attach(line, pending, args)
        elif line.startswith("/"):
            print(f"unknown command {line.split()[0]!r}; {REPL_HELP}", file=sys.stderr)
        else:
            user = {"role": "user", "content": [*pending, line] if pending else line}
            try:
                reasoning, answer = _turn(chat_model, [*history, user], args)
            except (ValueError, OSError) as e:  # a bad file or knob: report and keep the conversation as it was
                full = " (/reset starts a new conversation)" if type(e).__name__ == "ContextLengthError" else ""
                print(f"error: {_one_line(e)}{' (attachments dropped)' if pending else ''}{full}", file=sys.stderr)
                pending = []
                continue
            # The reasoning is kept in its own field, as the chat template expects it (it drops it from turns
            # before the last user query and never leaves stray tags in the answer).
            history += [user, {"role": "assistant", "content": answer, "reasoning_content": reasoning}]
            pending = []


def _check_video_flags(args) -> None:
    """Video flags are checked before the slow load; one-shot they need a --video (else they would do nothing)."""
    from vlmcook.data.video import check_knobs

    given = [f"--{k.replace('_', '-')}" for k in ("fps", "max_frames", "packing", "max_visual_tokens")
             if getattr(args, k) is not None]
    if given and args.question is not None and not args.video:
        raise ValueError(f"{', '.join(given)}: video sampling flags need a --video, and none is given")
    try:
        check_knobs(args.fps, args.max_frames, args.packing, args.max_visual_tokens, query_num=1)
    except ValueError as e:
        raise ValueError(f"--{str(e).replace('_', '-')}") from None


def _chat(args) -> int:
    for f in [*(args.image or []), *([args.video] if args.video else [])]:
        if not Path(f).is_file():
            raise FileNotFoundError(f"{f}: no such file")
    _check_video_flags(args)
    chat_model = _load_chat_model(args)
    if args.question is None:
        return _repl(chat_model, args)
    media = _media(args)
    _turn(chat_model, [{"role": "user", "content": [*media, args.question] if media else args.question}], args)
    return 0


# ---- serve ----------------------------------------------------------------------------------------------------
def _serve(args) -> int:
    try:
        import uvicorn  # noqa: F401
        from vlmcook.infer import serve
    except ImportError as e:
        raise FileNotFoundError(f"the server needs the 'serve' extra ({e}): pip install 'vlmcook[serve]'") from None
    if args.allowed_media_dir and not Path(args.allowed_media_dir).is_dir():
        raise FileNotFoundError(f"--allowed-media-dir {args.allowed_media_dir}: no such folder")
    name = args.served_model_name or Path(args.model or DEFAULT_MODEL).resolve().name
    settings = serve.ServeSettings(model_name=name, allowed_media_dir=Path(args.allowed_media_dir).resolve()
                                   if args.allowed_media_dir else None, max_request_mb=args.max_request_mb,
                                   max_media_mb=args.max_media_mb, max_images=args.max_images,
                                   max_videos=args.max_videos, max_frames=args.max_frames,
                                   max_queue=args.max_queue, max_rows=args.max_rows,
                                   max_kv_tokens=args.max_kv_tokens)  # checks the limits before the slow load
    chat_model = _load_chat_model(args)
    print(f"vlmcook serve: {name} on http://{args.host}:{args.port}/v1 (local media: "
          f"{settings.allowed_media_dir or 'disabled'})", file=sys.stderr)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print("vlmcook serve: warning: listening beyond this machine; there is no authentication", file=sys.stderr)
    serve.run(chat_model, args.host, args.port, settings, args.log_level)
    return 0


CHAT_EXAMPLES = """examples:
  vlmcook chat "What is 2+2?"                                    one question to the demo checkpoint
  vlmcook chat --model ckpt/ --image a.png --image b.png "Compare the two images."
  vlmcook chat --video clip.mp4 --fps 5 --packing 3 --stats "What happens?"
  vlmcook chat --think --think-budget 256 --stream "Why is the sky blue?"
  vlmcook chat --image doc.png                                   interactive: questions on stdin, /reset, /quit

The answer goes to stdout; the reasoning (--think), --stats and notices go to stderr."""

SERVE_EXAMPLES = """examples:
  vlmcook serve --model ckpt/ --port 8000 --allowed-media-dir ~/media
  curl localhost:8000/v1/chat/completions -H 'content-type: application/json' \\
    -d '{"messages": [{"role": "user", "content": "hi"}], "enable_thinking": false}'

Images and videos come as data:<type>;base64,... URLs, or as file:///paths / plain paths under --allowed-media-dir
(symlinks resolved first). http(s) URLs are refused: the server never fetches from the network."""


def device_flag(spec: str) -> str:
    """--device, checked against this machine before anything loads."""
    from vlmcook.checkpoint import resolve_device

    try:
        resolve_device(spec)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).replace("; use cpu", "; use --device cpu")) from None
    return spec


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="DIR", help=f"checkpoint folder in the released layout (default: "
                                                   f"{DEFAULT_MODEL}, made by `make demo`)")
    p.add_argument("--dtype", help="float32 | bfloat16 | float16 (default: the checkpoint's; fp32 on CPU)")
    p.add_argument("--device", type=device_flag, help="cpu | cuda | cuda:N | mps (default: cuda when present)")


def _add_chat_parser(sub) -> None:
    c = sub.add_parser("chat", help="talk to a checkpoint about images and videos (one-shot or interactive)",
                       description="Ask a question (one-shot), or leave it out for a multi-turn chat on stdin.",
                       epilog=CHAT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_args(c)
    c.add_argument("question", nargs="?", help="the question; without it, an interactive chat reads stdin lines")
    c.add_argument("--image", action="append", metavar="F", help="an image file (repeat for several)")
    c.add_argument("--video", metavar="F", help="a video file (needs the 'video' extra, PyAV)")
    c.add_argument("--think", action="store_true", help="long thinking mode; the reasoning is shown apart")
    c.add_argument("--think-budget", type=int, metavar="N", help="close the thinking after N tokens")
    c.add_argument("--fps", type=float, metavar="N", help="video sampling rate (default 5, at most 10)")
    c.add_argument("--max-frames", type=int, metavar="N", help="at most N video frames")
    c.add_argument("--packing", type=int, metavar="N", help="video frames per package, 1..6 (default: automatic)")
    c.add_argument("--max-visual-tokens", type=int, metavar="N", help="video token budget")
    c.add_argument("--max-slice-nums", type=int, metavar="N", help="image slices (default: the checkpoint's)")
    c.add_argument("--max-new-tokens", type=int, metavar="N", help="completion length limit")
    c.add_argument("--temperature", type=float, metavar="T", help="0 = greedy")
    c.add_argument("--top-p", type=float, metavar="P")
    c.add_argument("--top-k", type=int, metavar="K")
    c.add_argument("--repetition-penalty", type=float, metavar="R")
    c.add_argument("--seed", type=int, metavar="S", help="sampling seed (same seed, same answer)")
    c.add_argument("--stream", action="store_true", help="print the text as it is generated")
    c.add_argument("--stats", action="store_true", help="print token accounting (visual tokens, video packages "
                                                        "and their time spans) and prefill/decode speed")
    c.set_defaults(fn=_chat)


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (1..65535)")
    return port


def _add_serve_parser(sub) -> None:
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/chat/completions)",
                       description="Serve a checkpoint over HTTP in the OpenAI chat-completions format.",
                       epilog=SERVE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_args(s)
    s.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=_port, default=8000, help="1..65535 (default 8000)")
    s.add_argument("--served-model-name", help="the model id clients send (default: the folder's name)")
    s.add_argument("--allowed-media-dir", metavar="DIR", help="local files may be read from this folder only "
                                                               "(default: none, data URLs only)")
    s.add_argument("--max-request-mb", type=float, default=32.0, help="request body limit (default 32)")
    s.add_argument("--max-media-mb", type=float, default=16.0, help="one decoded image/video limit (default 16)")
    s.add_argument("--max-images", type=int, default=8, help="images per request (default 8)")
    s.add_argument("--max-videos", type=int, default=2, help="videos per request (default 2)")
    s.add_argument("--max-frames", type=int, default=64, help="frames per video (default 64)")
    s.add_argument("--max-queue", type=int, help="requests waiting to join the running batch; more get HTTP 429 "
                                                 "(default: as many as --max-rows)")
    s.add_argument("--max-rows", type=int, help="rows decoding together (default: one per 1024 KV positions, <= 64)")
    s.add_argument("--max-kv-tokens", type=int, help="KV-cache positions of all running rows; a request that can "
                                                     "never fit gets HTTP 400 (default: half the free memory)")
    s.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug", "trace"),
                   help="uvicorn log level (default info)")
    s.set_defaults(fn=_serve)


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line, `vlmcook chat: error: argument --fps: ... (see vlmcook chat --help)`,
    instead of the whole usage block (dozens of lines for `train`); exit code 2 as argparse's. Sub-commands
    inherit the class."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="vlmcook", description="MiniCPM-V 4.5 in plain PyTorch: run, train, reproduce.")
    from vlmcook import __version__

    p.add_argument("--version", action="version", version=f"vlmcook {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("demo", help="the main job: the recipe at toy scale, trained here on data made here (CPU)",
                       description="Runs recipes/demo.py: the whole recipe on a 1.3M-parameter model trained from "
                                   "scratch on generated pages and videos, then evaluation and a report with plots.")
    d.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    d.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    d.add_argument("--quick", action="store_true", help="the short plan (a few minutes on 2 cores; a smoke run)")
    d.add_argument("--steps", type=int, default=None, metavar="N",
                   help="optimizer steps of every stage (overrides the plan; for smoke runs)")
    d.add_argument("--rl", action="store_true",
                   help="instead: the hybrid-vs-long-only RL comparison (default out: runs/demo_rl)")
    d.set_defaults(fn=_demo)

    i = sub.add_parser("info", help="describe a checkpoint folder (validates every shard without loading)")
    i.add_argument("model", help="checkpoint folder in the released layout")
    i.set_defaults(fn=_info)

    _add_chat_parser(sub)
    _add_serve_parser(sub)
    from vlmcook.train.cli import add_parser as add_train_parser

    add_train_parser(sub)
    from vlmcook.rl.cli import add_parser as add_rl_parser

    add_rl_parser(sub)
    from vlmcook.eval.cli import add_parser as add_eval_parser

    add_eval_parser(sub)

    data = sub.add_parser("data", help="generate training data").add_subparsers(dest="data_command", required=True,
                                                                                 metavar="KIND")
    from vlmcook.data.docs.cli import add_parser as add_docs_parser

    add_docs_parser(data)
    return p


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _close_progress_bars() -> None:
    """A progress bar an exception left open would otherwise share its line with the error message."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", [])):
        bar.close()


def _report(name: str, e: Exception) -> int:
    """Print one line for an exception that ended a command; -> the exit code."""
    _close_progress_bars()
    if isinstance(e, BrokenPipeError):  # `vlmcook chat ... | head -c 10`: the reader left; nothing more to say there
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    if isinstance(e, (ValueError, OSError, ImportError)):  # bad input, a missing file or extra: they name what/where
        print(f"{name}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":  # torch's is a RuntimeError
        print(f"{name}: error: out of memory ({_one_line(e)}); use smaller inputs or a smaller model", file=sys.stderr)
        return 1
    print(f"{name}: internal error: {type(e).__name__}: {_one_line(e)} (this is a bug; rerun with VLMCOOK_DEBUG=1 "
          f"for the traceback and report it)", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if os.environ.get("VLMCOOK_DEBUG", "") not in ("", "0"):
        return int(args.fn(args) or 0)
    try:
        code = int(args.fn(args) or 0)
        sys.stdout.flush()  # a reader that left shows up here, inside the boundary, not at interpreter exit
        return code
    except KeyboardInterrupt:
        _close_progress_bars()
        return 130
    except Exception as e:
        return _report(f"vlmcook {args.command}", e)


if __name__ == "__main__":
    sys.exit(main())
