"""Kernels on demand: what the lab boots and tests, found or built once and cached.

    kernel      the catalog (kernels/catalog.toml), spec resolution, and the artifact store
                (cache_dir()/kernels/<key>/, complete or absent); python -m lab.kernels.kernel
    kbuild      config fragments and make, in one persistent tree per source
    sources     one module per source kind (debsrc:, deb:, git:, tarball:, bzimage:)
    bzimage     the bzImage setup header: version, size, payload
"""
