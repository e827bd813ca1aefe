# Developer shortcuts; the README's two commands are ./dev demo and ./dev test.
.PHONY: demo test bench

demo:
	./dev demo

test:
	./dev test

# The benchmark (issue: performance). Needs Debian's isync and getmail6 (installed when run as root).
bench:
	./dev bench
