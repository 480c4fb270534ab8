# Self-test of run_cpython_tests.py: the same results with and without
# hotpool, one test failing in both (reported "also without hotpool").
import unittest


class Equal(unittest.TestCase):
    def test_passes(self):
        self.assertEqual(sum(range(10)), 45)

    def test_fails_everywhere(self):
        self.fail("fails with and without hotpool")

    def test_subtests(self):
        for size in (16, 48, 1024):
            with self.subTest(size=size):
                self.assertEqual(len(bytearray(size)), size)
