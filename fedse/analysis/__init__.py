"""Analysis: a run's log, tables and plots (:mod:`.report`), and comparisons of methods under one
partition and budget (:mod:`.comparison`)."""
