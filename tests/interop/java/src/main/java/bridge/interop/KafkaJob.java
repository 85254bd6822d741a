package bridge.interop;

import java.io.IOException;
import java.nio.ByteBuffer;
import java.security.SecureRandom;
import java.util.Map;
import java.util.Properties;
import java.util.UUID;
import org.apache.avro.Schema;
import org.apache.avro.generic.GenericRecord;
import org.apache.avro.generic.GenericRecordBuilder;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerConfig;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.common.serialization.ByteArraySerializer;
import org.apache.kafka.common.serialization.StringSerializer;

/**
 * One test.Echo job sent to a bridge queue (a Kafka topic) as a Java service would, shared by
 * KafkaEnqueue and RegistryEnqueue: they differ only in how a record is framed.
 */
final class KafkaJob {
  static final String ENVELOPE = "bridge.JobEnvelope";
  static final String PAYLOAD = "test.Echo";

  private static final SecureRandom RANDOM = new SecureRandom();

  private KafkaJob() {}

  /** How a record becomes bytes: the same framing is used for the envelope and its payload. */
  @FunctionalInterface
  interface Framing {
    byte[] frame(GenericRecord record) throws IOException;
  }

  /** Sends test.Echo {n, text} to topic `queue` keyed by `key`; returns the job id once acked. */
  static String enqueue(Map<String, Schema> schemas, String bootstrap, String queue, int n,
      String text, String key, Framing framing) throws Exception {
    GenericRecord payload =
        new GenericRecordBuilder(schemas.get(PAYLOAD)).set("n", n).set("text", text).build();
    long now = System.currentTimeMillis();
    String id = uuid7(now);
    GenericRecord envelope = envelope(schemas.get(ENVELOPE), id, payload, framing, queue, key, now);
    send(bootstrap, queue, key, framing.frame(envelope));
    return id;
  }

  /** The envelope around `payload`; attempt, replays, errors and nullable fields take defaults. */
  private static GenericRecord envelope(Schema schema, String id, GenericRecord payload,
      Framing framing, String queue, String key, long now) throws IOException {
    return new GenericRecordBuilder(schema)
        .set("id", id)
        .set("type", payload.getSchema().getFullName())
        .set("payload", ByteBuffer.wrap(framing.frame(payload)))
        .set("queue", queue)
        .set("key", key)
        .set("created_at", now)
        .set("headers", Map.of("producer", "java"))
        .set("origin", "interop-java")
        .build();
  }

  /** Produces one record with acks=all and idempotence, as docs/envelope.md asks of producers. */
  private static void send(String bootstrap, String topic, String key, byte[] value)
      throws Exception {
    Properties config = new Properties();
    config.put(ProducerConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
    config.put(ProducerConfig.ACKS_CONFIG, "all");
    config.put(ProducerConfig.ENABLE_IDEMPOTENCE_CONFIG, true);
    try (KafkaProducer<String, byte[]> producer =
        new KafkaProducer<>(config, new StringSerializer(), new ByteArraySerializer())) {
      // The record key is the envelope's key, as bridge sends it; get() waits for the ack.
      producer.send(new ProducerRecord<>(topic, key, value)).get();
    }
  }

  /** A UUIDv7 (RFC 9562): 48 bits of Unix milliseconds, the version, then random bits. */
  static String uuid7(long nowMs) {
    long random = RANDOM.nextLong();
    long high = nowMs << 16 | 0x7000 | (random >>> 52);
    long low = RANDOM.nextLong() & 0x3FFFFFFFFFFFFFFFL | 0x8000000000000000L;
    return new UUID(high, low).toString();
  }
}
