"""A tiny project for the CI tests: `vmctl run --copy` brings it into a fresh VM."""


def add(a, b):
    return a + b


def mean(values):
    return sum(values) / len(values)
