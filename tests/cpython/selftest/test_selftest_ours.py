# Self-test of run_cpython_tests.py: a subtest that fails only under
# LD_PRELOAD, which the runner must count as a failure of ours.
import os
import unittest


class Ours(unittest.TestCase):
    def test_passes(self):
        pass

    def test_fails_under_preload(self):
        for preloaded in (False, True):
            with self.subTest(preloaded=preloaded):
                if preloaded:
                    self.assertNotIn("hotpool", os.environ.get("LD_PRELOAD", ""))
