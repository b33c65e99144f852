"""The real-cluster e2e's library: test modules import from here, never from one another.

- ``cluster``: the cluster handle (kubectl, helm, bounded waits, pod readiness, a failing step's evidence);
- ``release``: the chart's object names and labels, the values files, the bounds of every wait, the
  helm flags and tools the tests pass;
- ``load``: client load built on scripts.client, with the ports of scripts.serve;
- ``fleet``: the simulated GPU fleet's nodes and a pod watch;
- ``results``: the figures a test measured, written to bench/results.
"""
