"""Translation-correctness corpus for btvm (i386, 32-bit protected mode).

See corpus/README.md.  ``corpus.oracle`` holds the Unicorn oracle, the
undefined-flags table and the result comparison used by the tests.
"""
