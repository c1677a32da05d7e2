"""Benchmark tasks for `vlmcook eval`: one file per family, each a class with load / limit / messages / score /
aggregate (see common.py for the shared TSV reader and Item). `make_task(name)` builds one by its CLI name."""

from __future__ import annotations

from vlmcook.eval.tasks.common import Item, SampleError  # noqa: F401

TASK_NAMES = ("mcq", "mmbench", "mmmu", "ocrbench", "docvqa", "infovqa", "textvqa", "videomme", "jsonl")


def make_task(name: str, verifier: str | None = None):
    from vlmcook.eval.tasks.jsonl import JsonlTask
    from vlmcook.eval.tasks.mcq import McqTask, MmbenchTask, MmmuTask
    from vlmcook.eval.tasks.ocrbench import OcrBenchTask
    from vlmcook.eval.tasks.videomme import VideoMmeTask
    from vlmcook.eval.tasks.vqa import VqaTask

    if verifier is not None and name != "jsonl":
        raise ValueError("--verifier only applies to --task jsonl")
    makers = {"mcq": McqTask, "mmbench": MmbenchTask, "mmmu": MmmuTask, "ocrbench": OcrBenchTask,
              "docvqa": lambda: VqaTask("docvqa"), "infovqa": lambda: VqaTask("infovqa"),
              "textvqa": lambda: VqaTask("textvqa"), "videomme": VideoMmeTask, "jsonl": lambda: JsonlTask(verifier)}
    if name not in makers:
        raise ValueError(f"--task {name!r} is not one of {', '.join(TASK_NAMES)}")
    return makers[name]()
