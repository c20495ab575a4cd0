"""The data sets of ``kfopt compare``, all already on the machine: no download.

* ``embedded_text``: a fixed slice of the Python standard library's own source, read from the running
  interpreter (the default text of the character-level task).
* ``read_text``: the user's own text file (``--text FILE``).
* ``load_digits``: the 8x8 handwritten digits bundled with scikit-learn (the optional ``digits`` extra).
"""

from __future__ import annotations

import hashlib
import os
import sysconfig

import torch

#: Standard-library files present, as plain modules or package ``__init__``s, in every CPython >= 3.10
#: (modules that became packages or were removed in later versions, e.g. pathlib, zipfile, re, aifc, are
#: left out; so are tkinter and idlelib, which some distributions package separately), in the order they
#: are concatenated: a first alphabetical group of about 1.2 MB (the ``small`` text), then a second one.
STDLIB_FILES = (
    "abc.py", "argparse.py", "ast.py", "bisect.py", "calendar.py", "collections/__init__.py",
    "contextlib.py", "copy.py", "csv.py", "dataclasses.py", "difflib.py", "enum.py", "fractions.py",
    "functools.py", "heapq.py", "inspect.py", "json/decoder.py", "json/encoder.py", "logging/__init__.py",
    "pprint.py", "random.py", "shutil.py", "statistics.py", "string.py", "textwrap.py", "threading.py",
    "typing.py",
) + (
    "_pydecimal.py", "_pyio.py", "base64.py", "bdb.py", "cmd.py", "code.py", "codecs.py", "codeop.py",
    "colorsys.py", "concurrent/futures/process.py", "configparser.py", "dis.py", "doctest.py",
    "email/_header_value_parser.py", "email/message.py", "filecmp.py", "fileinput.py", "fnmatch.py",
    "ftplib.py", "getopt.py", "gettext.py", "glob.py", "gzip.py", "hashlib.py", "hmac.py", "http/client.py",
    "http/cookiejar.py", "http/server.py", "imaplib.py", "ipaddress.py", "json/__init__.py", "locale.py",
    "logging/handlers.py", "lzma.py", "mailbox.py", "mimetypes.py", "multiprocessing/managers.py",
    "numbers.py", "operator.py", "optparse.py", "os.py", "pdb.py", "pickle.py", "pickletools.py",
    "platform.py", "plistlib.py", "poplib.py", "posixpath.py", "pydoc.py", "queue.py", "quopri.py",
    "reprlib.py", "rlcompleter.py", "runpy.py", "sched.py", "secrets.py", "selectors.py", "shelve.py",
    "shlex.py", "smtplib.py", "socket.py", "socketserver.py", "ssl.py", "stat.py", "subprocess.py",
    "symtable.py", "tabnanny.py", "tarfile.py", "tempfile.py", "timeit.py", "tokenize.py", "trace.py",
    "traceback.py", "tracemalloc.py", "types.py", "unittest/case.py", "unittest/mock.py", "urllib/parse.py",
    "urllib/request.py", "uuid.py", "warnings.py", "wave.py", "weakref.py", "webbrowser.py",
    "xml/dom/minidom.py", "xml/etree/ElementTree.py", "zipapp.py", "zipimport.py",
)

#: A text shorter than this cannot fill the training and validation windows of the largest model.
MIN_TEXT_BYTES = 10_000


def embedded_text(length: int) -> tuple[bytes, dict]:
    """The first ``length`` bytes of ``STDLIB_FILES`` joined by newlines (all of them if shorter), and a
    description.

    The text differs slightly between Python versions (the files evolve): the description lists the
    files read and the text's SHA-256 (and the results JSON the Python version), so that results can be
    matched to their data.
    """
    root = sysconfig.get_paths()["stdlib"]
    parts, used = [], []
    for name in STDLIB_FILES:
        path = os.path.join(root, name)
        if os.path.isfile(path) and sum(map(len, parts)) < length:
            with open(path, "rb") as f:
                parts.append(f.read())
            used.append(name)
    text = b"\n".join(parts)[:length]
    if len(text) < MIN_TEXT_BYTES:
        raise RuntimeError(
            f"the Python standard library's source was not found under {root} (this interpreter ships "
            "compiled files only?); train on your own text with --text FILE"
        )
    return text, {"source": "python standard library", "stdlib_dir": root, "files": used,
                  "bytes": len(text), "sha256": hashlib.sha256(text).hexdigest()}


def read_text(path: str) -> tuple[bytes, dict]:
    """The bytes of the file at ``path`` (any encoding: the model is byte-level), and a description."""
    with open(path, "rb") as f:
        text = f.read()
    if len(text) < MIN_TEXT_BYTES:
        raise ValueError(f"{path}: {len(text)} bytes; a text of at least {MIN_TEXT_BYTES} bytes is needed")
    return text, {"source": "file", "path": os.path.abspath(path), "bytes": len(text),
                  "sha256": hashlib.sha256(text).hexdigest()}


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits: images (N, 1, 8, 8) float32 in [0, 1] and labels (N,) int64."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as exc:
        raise RuntimeError(
            "the digits task needs scikit-learn (it ships the data set): "
            "python -m pip install 'kfopt[digits]'"
        ) from exc
    bunch = sklearn_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return images, torch.tensor(bunch.target, dtype=torch.int64)
