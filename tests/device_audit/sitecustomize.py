"""Imported at start-up by every Python process whose PYTHONPATH holds this folder (tests/device_audit.py puts it
there); does nothing unless TLDR_DEVICE_AUDIT names an output folder.

NCCL refuses a CPU tensor in a collective; gloo, the CPU suite's backend, takes it. On a CPU the compute device is
the CPU as well, so this audit marks what would stay on the CPU of a CUDA machine: a tensor created without a
device (`torch.zeros(3)`, `torch.tensor(...)`, `torch.randperm(n)`; `device=None` counts as none), `.cpu()`, and
what is computed only from such tensors (`.cpu()` of a CPU tensor returns the tensor itself: not caught here). A tensor handed an explicit device (`device=...`, `.to(device)`) is on
the compute device, and so is what is computed from it (CUDA's rule for mixed inputs: a CPU scalar with a CUDA
tensor gives a CUDA tensor). In-place operations keep their tensor's mark. Every tensor handed to a
torch.distributed collective is checked: a marked one is a violation, recorded with the calling line of our code.
All-gathers are also counted by the innermost function of our scripts on the stack (FSDP's parameter gathers
included), to count them per phase. At exit each process writes {TLDR_DEVICE_AUDIT}/audit_{pid}.json. Only processes
started on one of the scripts are audited (TLDR_DEVICE_AUDIT_ROOT: another folder holding them, for the self-test)."""

import os

if os.environ.get("TLDR_DEVICE_AUDIT"):
    import atexit
    import json
    import sys
    from collections import Counter

    import torch
    import torch.distributed as dist
    from torch.overrides import TorchFunctionMode
    from torch.utils._pytree import tree_leaves

    OUT = os.environ["TLDR_DEVICE_AUDIT"]
    ROOT = os.environ.get("TLDR_DEVICE_AUDIT_ROOT") or os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    OURS = {os.path.join(ROOT, f) for f in ("sft.py", "reward_model.py", "ppo_tldr.py", "dpo.py", "value_head.py")}
    MARK = "_tldr_default_device"
    record = dict(argv=sys.argv, rank=os.environ.get("RANK"), checked=Counter(), violations=[], all_gathers=Counter())

    def marked(t):
        return isinstance(t, torch.Tensor) and getattr(t, MARK, False)

    def set_mark(t, value):
        try:
            if value:
                setattr(t, MARK, True)
            elif MARK in t.__dict__:
                delattr(t, MARK)
        except (AttributeError, RuntimeError):  # a tensor type without a __dict__
            pass

    def names_a_device(func, args, kwargs):
        if kwargs.get("device") is not None:
            return True
        if func in (torch.Tensor.to,):
            return any(isinstance(a, (torch.device, str)) for a in args[1:])
        return func in (torch.Tensor.cuda,)

    class DefaultDeviceMode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
            if not outputs:
                return out
            if func is torch.Tensor.to and len(args) > 1 and isinstance(args[1], torch.Tensor):
                mark = marked(args[1])  # .to(other): other's device
            elif names_a_device(func, args, kwargs):
                mark = False
            elif func is torch.Tensor.cpu:
                mark = True
            elif not inputs:
                mark = True  # created without a device: the default device, the CPU
            else:
                mark = all(marked(t) for t in inputs)
            for t in outputs:
                if any(t is i for i in inputs) and not names_a_device(func, args, kwargs):
                    continue  # in place, or returned unchanged (also `.cpu()` of a CPU tensor): keeps its own mark
                set_mark(t, mark)
            return out

    def our_caller():
        """(file:line, function) of the innermost frame of our scripts on the stack; (None, None) if none."""
        frame = sys._getframe(2)
        while frame is not None:
            if os.path.abspath(frame.f_code.co_filename) in OURS:
                return f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno}", frame.f_code.co_name
            frame = frame.f_back
        return None, None

    def checked(name, fn):
        def wrapper(*args, **kwargs):
            where, function = our_caller()
            if name.startswith("all_gather"):
                record["all_gathers"][function or "(outside our scripts)"] += 1
            tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            if tensors:
                record["checked"][name] += 1
            for t in tensors:
                if marked(t):
                    record["violations"].append(dict(collective=name, where=where, function=function,
                                                     shape=list(t.shape), dtype=str(t.dtype)))
            return fn(*args, **kwargs)

        wrapper.__wrapped__ = fn
        return wrapper

    for name in ["all_reduce", "broadcast", "reduce", "all_gather", "all_gather_into_tensor", "all_gather_single",
                 "reduce_scatter", "reduce_scatter_tensor", "reduce_scatter_single", "all_to_all",
                 "all_to_all_single", "gather", "scatter", "send", "recv", "isend", "irecv"]:
        if hasattr(dist, name):
            setattr(dist, name, checked(name, getattr(dist, name)))

    def write():
        os.makedirs(OUT, exist_ok=True)
        with open(os.path.join(OUT, f"audit_{os.getpid()}.json"), "w") as f:
            json.dump(record, f)

    if any(os.path.abspath(a) in OURS for a in sys.argv[:1]):  # only the scripts' own processes are audited
        DefaultDeviceMode().__enter__()
        atexit.register(write)
