"""Bad arguments raise a clear exception naming the argument, in eager (C++ checks) and while tracing (fake)."""

import pytest
import torch

import lora_ops


def good(device="cpu"):
    return dict(
        x=torch.randn(5, 8, device=device),
        lora_a=torch.randn(3, 2, 8, device=device),
        lora_b=torch.randn(3, 6, 2, device=device),
        adapter_ids=torch.tensor([0, 1, 2, -1, 0], device=device),
    )


def call(kw, device):
    kw = {k: (v.to("meta") if device == "meta" and isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    return lora_ops.grouped_lora(**kw)


CASES = [
    # (change to the good arguments, exception, text the message must contain)
    (dict(x=torch.randn(5, 8).int()), TypeError, "x must be"),
    (dict(x=torch.tensor(1.0)), ValueError, "x must have shape"),
    (dict(lora_a=torch.randn(3, 8)), ValueError, "lora_a must have shape"),
    (dict(lora_b=torch.randn(6, 2)), ValueError, "lora_b must have shape"),
    (dict(lora_a=torch.randn(3, 2, 7)), ValueError, "lora_a must have shape"),
    (dict(lora_b=torch.randn(3, 6, 3)), ValueError, "lora_b must have shape"),
    (dict(lora_b=torch.randn(2, 6, 2)), ValueError, "lora_b must have shape"),
    (dict(lora_a=torch.randn(3, 2, 8).double()), TypeError, "lora_a has dtype"),
    (dict(lora_b=torch.randn(3, 6, 2).half()), TypeError, "lora_b has dtype"),
    (dict(adapter_ids=torch.zeros(5)), TypeError, "adapter_ids must be int32 or int64"),
    (dict(adapter_ids=torch.zeros(4, dtype=torch.int64)), ValueError, "adapter_ids must have shape"),
    (dict(adapter_ids=torch.zeros(5, 2, 1, dtype=torch.int64)), ValueError, "adapter_ids must have shape"),
    (dict(scales=torch.ones(4)), ValueError, "scales must have shape"),
    (dict(scales=torch.ones(3, dtype=torch.int64)), TypeError, "scales must be a floating-point"),
    (dict(weights=torch.ones(5, 2)), ValueError, "weights must have the shape"),
    (dict(weights=torch.ones(5, dtype=torch.int64)), TypeError, "weights must be a floating-point"),
]


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("change,exc,text", CASES)
def test_bad_arguments(device, change, exc, text):
    kw = good()
    kw.update(change)
    with pytest.raises(exc, match=text):
        call(kw, device)


@pytest.mark.parametrize("bad_id", [3, -2, 2**62, -(2**62)])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_out_of_range_ids_raise_index_error(bad_id, dtype):
    kw = good()
    if dtype == torch.int32 and abs(bad_id) > 2**31 - 1:
        bad_id = 2**31 - 1 if bad_id > 0 else -(2**31)
    kw["adapter_ids"] = torch.tensor([0, 1, bad_id, -1, 0], dtype=dtype)
    with pytest.raises(IndexError, match=r"adapter_ids contains .* outside \[-1, 3\)"):
        lora_ops.grouped_lora(**kw)


def test_top_k_out_of_range_ids_raise_index_error():
    kw = good()
    kw["adapter_ids"] = torch.tensor([[0, 1], [2, 7], [0, 0], [-1, -1], [1, 2]])
    with pytest.raises(IndexError, match="adapter_ids"):
        lora_ops.grouped_lora(**kw)


def test_device_mismatch_names_argument():
    kw = good()
    kw["lora_a"] = kw["lora_a"].to("meta")
    with pytest.raises(ValueError, match="lora_a is on meta but x is on cpu"):
        lora_ops.grouped_lora(**kw)
