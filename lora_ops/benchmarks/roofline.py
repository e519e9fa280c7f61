"""Peak memory bandwidth of the device a benchmark runs on: the memory roofline that GPU results are reported
against (grouped LoRA is memory-bound at serving shapes, so % of peak bandwidth is % of the roofline).

The peak is the vendor's specified DRAM bandwidth for the GPUs in ``SPEC_GBPS`` (decimal GB/s, as data sheets give
it); for any other GPU, and on CPU, it is the best of the bandwidths measured in the same run. Results record which
one was used (``source``), so a % of a spec figure is never mistaken for a % of a measurement.
"""

from __future__ import annotations

from typing import Optional

__all__ = ["SPEC_GBPS", "spec_bandwidth", "peak_bandwidth"]

# (substrings that must all occur in the lower-cased torch.cuda device name, GB/s or None = not known). First match
# wins, so the more specific entries (H100 PCIe / NVL, GH200 before H200) come before the generic ones.
SPEC_GBPS = (
    (("gh200",), None),  # sold with HBM3 and HBM3e: use the measured bandwidth
    (("h100", "pcie"), 2000.0),  # HBM2e
    (("h100", "nvl"), 3900.0),
    (("h100",), 3350.0),  # SXM5 80 GB HBM3
    (("h200",), 4800.0),  # HBM3e (SXM and NVL)
    (("b200",), 8000.0),
    (("a100", "80gb", "pcie"), 1935.0),
    (("a100", "80gb"), 2039.0),  # SXM4 80 GB
    (("a100",), 1555.0),  # 40 GB (SXM4 and PCIe)
    (("l40",), 864.0),  # L40 and L40S
    (("l4",), 300.0),
    (("a10g",), 600.0),
    (("a10",), 600.0),
    (("rtx 4090",), 1008.0),
    (("v100",), 900.0),  # SXM2 / PCIe 16-32 GB
    (("t4",), 320.0),
)


def spec_bandwidth(gpu_name: Optional[str]) -> Optional[float]:
    """The specified DRAM bandwidth (GB/s) of the GPU called ``gpu_name``, or None when it is not in the table."""
    if not gpu_name:
        return None
    name = gpu_name.lower()
    for needles, gbps in SPEC_GBPS:
        if all(n in name for n in needles):
            return gbps
    return None


def peak_bandwidth(gpu_name: Optional[str], measured: dict) -> dict:
    """``{"gbps", "source"}``: the GPU's spec bandwidth when known, else the best of ``measured``
    (``{label: {"gbps": ...}}``, e.g. the read and copy bandwidths measured in the run)."""
    spec = spec_bandwidth(gpu_name)
    if spec is not None:
        return {"gbps": spec, "source": f"spec sheet ({gpu_name})"}
    label, best = max(measured.items(), key=lambda kv: kv[1]["gbps"])
    return {"gbps": best["gbps"], "source": f"measured ({label}: {best['method']})"}
