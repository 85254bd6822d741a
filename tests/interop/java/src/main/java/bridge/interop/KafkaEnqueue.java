package bridge.interop;

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
 * Enqueues one test.Echo job on a bridge queue (a Kafka topic) as a Java service would: a
 * bridge.JobEnvelope in Avro's single-object encoding whose `payload` holds the single-object
 * encoded test.Echo, sent with acks=all. Prints the job id once Kafka acknowledged it.
 *
 * <p>Usage: KafkaEnqueue DIR[,DIR...] BOOTSTRAP QUEUE N TEXT KEY
 */
public final class KafkaEnqueue {
  private static final SecureRandom RANDOM = new SecureRandom();

  private KafkaEnqueue() {}

  public static void main(String[] args) throws Exception {
    Map<String, Schema> schemas = Schemas.load(args[0].split(","));
    String bootstrap = args[1], queue = args[2], key = args[5];
    Schema echo = schemas.get("test.Echo");
    GenericRecord payload =
        new GenericRecordBuilder(echo).set("n", Integer.parseInt(args[3])).set("text", args[4]).build();
    long now = System.currentTimeMillis();
    String id = uuid7(now);
    // attempt, replays, errors and the nullable fields take their schema defaults.
    GenericRecord envelope =
        new GenericRecordBuilder(schemas.get("bridge.JobEnvelope"))
            .set("id", id)
            .set("type", echo.getFullName())
            .set("payload", ByteBuffer.wrap(Schemas.singleObject(payload)))
            .set("queue", queue)
            .set("key", key)
            .set("created_at", now)
            .set("headers", Map.of("producer", "java"))
            .set("origin", "interop-java")
            .build();
    Properties config = new Properties();
    config.put(ProducerConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
    config.put(ProducerConfig.ACKS_CONFIG, "all");
    config.put(ProducerConfig.ENABLE_IDEMPOTENCE_CONFIG, true);
    try (KafkaProducer<String, byte[]> producer =
        new KafkaProducer<>(config, new StringSerializer(), new ByteArraySerializer())) {
      // The record key is the envelope's key, as bridge sends it; get() waits for the ack.
      producer.send(new ProducerRecord<>(queue, key, Schemas.singleObject(envelope))).get();
    }
    System.out.println(id);
  }

  /** A UUIDv7 (RFC 9562): 48 bits of Unix milliseconds, the version, then random bits. */
  static String uuid7(long nowMs) {
    long random = RANDOM.nextLong();
    long high = nowMs << 16 | 0x7000 | (random >>> 52);
    long low = RANDOM.nextLong() & 0x3FFFFFFFFFFFFFFFL | 0x8000000000000000L;
    return new UUID(high, low).toString();
  }
}
