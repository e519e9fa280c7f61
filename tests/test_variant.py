"""Wheel version labels, the torch pin and the import-time torch check (lora_ops/_variant.py)."""

import subprocess
import sys
import types

import pytest
import torch
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from lora_ops import _variant


@pytest.mark.parametrize("torch_version, cuda, label", [
    ("2.13.0+cpu", None, "0.1.0+torch2.13.cpu"),
    ("2.13.0", None, "0.1.0+torch2.13.cpu"),
    ("2.14.1", "13.0", "0.1.0+torch2.14.cu130"),
    ("2.14.1+cu128", "12.8", "0.1.0+torch2.14.cu128"),
])
def test_wheel_version_label(torch_version, cuda, label):
    version = _variant.wheel_version(torch_version, cuda)
    assert version == label
    assert str(Version(version)) == label  # a valid PEP 440 version, already in normal form
    assert Version(version).public == _variant.BASE_VERSION


def test_torch_pin_matches_every_variant_of_the_release_only():
    pin = _variant.torch_requirement("2.13.0+cpu")
    assert pin == "torch==2.13.0"
    spec = SpecifierSet(pin.removeprefix("torch"))
    assert spec.contains("2.13.0+cpu") and spec.contains("2.13.0") and spec.contains("2.13.0+cu130")
    assert not spec.contains("2.13.1") and not spec.contains("2.14.0")


@pytest.mark.parametrize("hooks, argv, wheel", [
    ({"build_wheel", "_build_with_temp_dir"}, ["setup.py", "bdist_wheel"], True),
    ({"prepare_metadata_for_build_wheel"}, ["setup.py", "dist_info"], True),  # pip wheel: metadata first
    ({"prepare_metadata_for_build_editable", "prepare_metadata_for_build_wheel"}, ["setup.py", "dist_info"], False),
    ({"build_editable"}, ["setup.py", "editable_wheel"], False),
    ({"build_sdist"}, ["setup.py", "sdist"], False),
    ({"<module>"}, ["setup.py", "bdist_wheel"], True),  # setup.py run directly
    ({"<module>"}, ["setup.py", "build_ext", "--inplace"], False),
])
def test_building_wheel(hooks, argv, wheel):
    assert _variant.building_wheel(hooks, argv) is wheel


@pytest.mark.parametrize("built_torch, built_cuda, torch_version, cuda", [
    ("2.13.0+cpu", None, "2.13.0+cpu", None),
    ("2.13.0+cpu", None, "2.13.0", "13.0"),        # a CPU build loads under a CUDA torch of the same release
    ("2.14.1", "13.0", "2.14.1+cu130", "13.0"),
    ("2.14.1+cu128", "12.8", "2.14.1+cu126", "12.6"),  # same CUDA major: same libcudart soname
])
def test_compatible_torch_passes(built_torch, built_cuda, torch_version, cuda):
    assert _variant.mismatch_message("0.1.0", built_torch, built_cuda, torch_version, cuda) is None


@pytest.mark.parametrize("built_torch, built_cuda, torch_version, cuda, fix", [
    ("2.13.0+cpu", None, "2.14.1", "13.0", '"lora_ops==0.1.0+torch2.14.cu130"'),
    ("2.14.1", "13.0", "2.14.1+cpu", None, '"lora_ops==0.1.0+torch2.14.cpu"'),    # CUDA build, CPU torch
    ("2.14.1+cu130", "13.0", "2.14.1+cu128", "12.8", '"lora_ops==0.1.0+torch2.14.cu128"'),  # other CUDA major
])
def test_mismatch_names_both_versions_and_the_fix(built_torch, built_cuda, torch_version, cuda, fix):
    version = _variant.wheel_version(built_torch, built_cuda)
    message = _variant.mismatch_message(version, built_torch, built_cuda, torch_version, cuda)
    assert f"lora_ops {version} was built against torch {built_torch}" in message
    assert f"but torch {torch_version}" in message
    assert f'pip install "torch=={built_torch.split("+")[0]}"' in message
    assert f"pip install --force-reinstall --no-deps {fix}" in message


def _fake_build_info(torch_version, cuda=None):
    return types.SimpleNamespace(VERSION="0.1.0+test", TORCH_VERSION=torch_version, CUDA_VERSION=cuda)


def test_check_installed_torch(monkeypatch):
    monkeypatch.setitem(sys.modules, "lora_ops._build_info", _fake_build_info(str(torch.__version__)))
    _variant.check_installed_torch()
    monkeypatch.setitem(sys.modules, "lora_ops._build_info", _fake_build_info("1.0.0"))
    with pytest.raises(ImportError) as raised:
        _variant.check_installed_torch()
    assert f"built against torch 1.0.0 (CPU), but torch {torch.__version__} " in str(raised.value)
    monkeypatch.setitem(sys.modules, "lora_ops._build_info", None)  # a build without the file: not checked
    _variant.check_installed_torch()


def test_import_refuses_before_loading_the_library():
    code = (
        "import sys, types\n"
        "sys.modules['lora_ops._build_info'] = types.SimpleNamespace("
        "VERSION='0.1.0+torch1.0.cpu', TORCH_VERSION='1.0.0', CUDA_VERSION=None)\n"
        "try:\n"
        "    import lora_ops\n"
        "except ImportError as e:\n"
        "    print('lora_ops._C' in sys.modules, e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    assert out.startswith("False lora_ops 0.1.0+torch1.0.cpu was built against torch 1.0.0 (CPU)"), out
