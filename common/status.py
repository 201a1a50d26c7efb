"""Process exit statuses shared by the launcher, the training loop and job scripts."""

EXIT_USER_ERROR = 2  # bad input the user can fix; the one-line message says how
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on request with a checkpoint; rerun to continue
