"""The streaming worker: request topic -> fetch -> decode -> batch -> caption -> result / dead-letter topics.

One module per concern:

- ``ports``: what the loop needs of a message, a request source, an output and a rebalance listener
  (real Kafka in ``captionfleet.worker.connectors.kafka``, in memory in the unit tests);
- ``items``: a request on its way through the worker, and where it came from;
- ``offsets``: per assigned partition, the messages still in flight and the offset that may be committed;
- ``answers``: the result and dead-letter records, shaped to fit the topic's size limit;
- ``metered``: the model, timed per batch for the metrics;
- ``stages``: the fetch threads and the model thread;
- ``commits``: the commit order below, and the consumer lag it leaves;
- ``loop``: ``StreamWorker``, the consumer thread that ties them together.

Threads and who owns what:

- the **consumer thread** (``StreamWorker.run``) owns the consumer, the offsets and the producer
  sends: it polls, parses each message into requests, hands them to the fetch threads, sends every
  finished request's result or dead letter, and commits;
- **fetch threads** read each image (policy first, see ``worker.fetch``) and pass the bytes on to the
  model thread, or a failure straight back;
- the **model thread** runs the same ``CaptionPipeline`` as the bulk path (decode pool, batcher,
  captioner), so batches span partitions and one bad image fails alone.

Rebalance callbacks run on kafka-python's IO thread while the consumer thread waits inside ``poll()``
or ``close()``, so the partition state is only ever touched by one thread at a time; the fetch and
model threads talk to the consumer thread through queues only.

**At least once.** A message's offset is committed only when every request in it has had its result
or dead letter acknowledged by the broker: the consumer thread takes the commit points (per partition,
the first offset with a request still in flight), flushes the producer (which returns only when
everything sent so far is acknowledged, or raises), and then commits those points, the quix-streams
order. A crash anywhere redoes at most the uncommitted tail; duplicates are possible, loss is not.

**Slow batches.** The consumer thread never waits on the model: when ``max_in_flight`` requests are
in flight it pauses fetching on its partitions and keeps calling ``poll()`` (which returns nothing
for paused partitions), so the group sees a live member however long a batch takes. Sizing
``max_poll_interval_ms`` from a batch budget was the alternative; it needs a budget that holds for
the worst batch on the slowest node, and a wrong guess means leaving the group, a rebalance and the
same slow batch again on the next owner, in a loop. Pausing needs no guess.

Nothing is re-exported here: importing ``ports`` (the Kafka adapter does) must not pull in the loop,
and with it torch and the pipeline.
"""
