"""Metadata lives in setup.cfg. This file only ships chatterbox_accel_autoload.pth into
site-packages, which implements `CHATTERBOX_ACCEL=1 python app.py` (see chatterbox_accel/autoload.py)."""
import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "chatterbox_accel_autoload.pth"


class BuildWithPth(build_py):
    def run(self):
        super().run()
        here = os.path.dirname(os.path.abspath(__file__))
        self.copy_file(os.path.join(here, PTH), os.path.join(self.build_lib, PTH), preserve_mode=0)


setup(cmdclass={"build_py": BuildWithPth})
