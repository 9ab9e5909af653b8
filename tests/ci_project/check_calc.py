import os
import unittest

import calc


class CalcTest(unittest.TestCase):
    def test_add(self):
        self.assertEqual(calc.add(2, 3), 5)

    def test_mean(self):
        self.assertEqual(calc.mean([1, 2, 3]), 2)

    def test_broken_on_request(self):
        # CI_BREAK=1 (vmctl run --env) makes the suite fail: the exit code is checked
        self.assertNotEqual(os.environ.get("CI_BREAK"), "1", "broken on request")


if __name__ == "__main__":
    unittest.main()
