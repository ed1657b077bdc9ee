"""What a route does before it falls through: several keys per provider, retries, circuit breakers.

The order, for each step of a route (see :mod:`at_gateway.routing`):

1. the step's circuit (:mod:`.breaker`, per provider and upstream model) is asked first: open, the step is
   skipped at once (an attempt with ``error: "circuit open"``, no network call);
2. a key is picked (:mod:`.keys`): cooling and disabled keys are skipped; when every key is cooling the
   step fails at once (or waits ``wait_for_key``, at most 5 s);
3. a provider slot is taken (``max_concurrency``, waiting up to ``queue_timeout``);
4. the request goes out; a failure is classified once (:func:`.backoff.classify`): key-scoped (429, 401,
   403) cools or disables that key, target-scoped (5xx, timeouts, connection errors) counts toward the
   key's cooldown and the circuit, request-scoped (other 4xx) ends the step with no retry;
5. a retryable failure is retried (``retries``) after a full-jitter backoff, or the upstream's
   ``Retry-After`` when shorter than what is left of the step's timeout, on the next key;
6. the step fails and the next one is tried; ``hedge_after`` starts the next one early.

State that must agree between the workers of one machine (cooldowns, disabled keys, circuits) lives in
:mod:`.state`, in shared memory mapped before the workers fork.
"""
