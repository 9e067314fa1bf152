"""Constants shared by the network tests (a module, not conftest, so imports are unambiguous)."""

LOOPBACK = "127.0.0.1"
#: Upper bound for any single wait in these tests (a bug fails instead of hanging).
STEP_TIMEOUT = 30.0
