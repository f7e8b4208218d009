"""The edge side: the draft model runtime, sampling and the drafter that proposes to the cloud verifier."""
