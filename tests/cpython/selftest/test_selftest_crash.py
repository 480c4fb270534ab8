# Self-test of run_cpython_tests.py: a module that crashes only under
# LD_PRELOAD, which the runner must count as a failure of ours.
import os
import unittest


class Crash(unittest.TestCase):
    def test_crashes_under_preload(self):
        if "hotpool" in os.environ.get("LD_PRELOAD", ""):
            os.abort()
