package bridge.interop;

import java.util.Map;
import org.apache.avro.Schema;

/**
 * Enqueues one test.Echo job on a bridge queue (a Kafka topic) as a Java service would: a
 * bridge.JobEnvelope in Avro's single-object encoding whose `payload` holds the single-object
 * encoded test.Echo, sent with acks=all. Prints the job id once Kafka acknowledged it.
 *
 * <p>Usage: KafkaEnqueue DIR[,DIR...] BOOTSTRAP QUEUE N TEXT KEY
 */
public final class KafkaEnqueue {
  private KafkaEnqueue() {}

  public static void main(String[] args) throws Exception {
    Map<String, Schema> schemas = Schemas.load(args[0].split(","));
    int n = Integer.parseInt(args[3]);
    String id =
        KafkaJob.enqueue(schemas, args[1], args[2], n, args[4], args[5], Schemas::singleObject);
    System.out.println(id);
  }
}
