"""Build hook: generate the protobuf stubs into the build tree (proto/generate.py is the one recipe)."""

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithProto(build_py):
    def run(self) -> None:
        spec = importlib.util.spec_from_file_location("proto_generate", Path(__file__).parent / "proto" / "generate.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.generate(Path(__file__).parent)
        # Package discovery ran before the stubs existed: add their package now.
        for package in module.generated_packages():
            if package not in self.packages:
                self.packages.append(package)
        super().run()


setup(cmdclass={"build_py": BuildPyWithProto})
