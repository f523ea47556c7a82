"""Kernel sources, the old single-module name: everything now lives in lab.sources
(one module per kind).  Kept so that importers of lab.ksource keep working."""

from lab.kernels.sources import (BINARIES, BUILDERS, SOURCE_KINDS, Fetched, PatchStack, Resolved, SourceRef,
                         apply_patch, atomic_write, fetch, parse_source, prepare_tree, resolve_source,
                         series, series_of, sha256_file)
from lab.kernels.sources.bzimage import bzimage_version
from lab.kernels.sources.deb import _load_order
from lab.kernels.sources.tarball import KERNEL_ORG, tarball_url

__all__ = ["BINARIES", "BUILDERS", "SOURCE_KINDS", "Fetched", "PatchStack", "Resolved", "SourceRef",
           "apply_patch", "atomic_write", "fetch", "parse_source", "prepare_tree", "resolve_source",
           "series", "series_of", "sha256_file", "bzimage_version", "_load_order", "KERNEL_ORG",
           "tarball_url"]
