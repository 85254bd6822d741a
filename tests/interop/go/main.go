// Command enqueue puts one test.Echo job on a bridge queue over RabbitMQ, as a Go service would:
// a bridge.JobEnvelope in Avro's single-object encoding whose payload field holds the
// single-object encoded test.Echo, published to the exchange <prefix>.jobs with the queue as
// routing key, persistent and mandatory, and confirmed by the broker. It prints the job id.
//
// With -fingerprints it prints "FULL_NAME FINGERPRINT" (CRC-64-AVRO, 16 hex digits) instead.
package main

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/hamba/avro/v2"
	"github.com/hamba/avro/v2/soe"
	amqp "github.com/rabbitmq/amqp091-go"
)

// Echo is the payload of a test.Echo job (tests/schemas/test.Echo.avsc).
type Echo struct {
	N       int32  `avro:"n"`
	Text    string `avro:"text"`
	SleepMS int32  `avro:"sleep_ms"`
}

// JobError is one failed attempt (bridge/schemas/bridge.JobError.avsc).
type JobError struct {
	Attempt   int32   `avro:"attempt"`
	At        int64   `avro:"at"`
	Type      string  `avro:"type"`
	Message   string  `avro:"message"`
	Traceback *string `avro:"traceback"`
}

// Envelope is a job (bridge/schemas/bridge.JobEnvelope.avsc); a nil pointer is Avro null.
type Envelope struct {
	ID             string            `avro:"id"`
	Type           string            `avro:"type"`
	Payload        []byte            `avro:"payload"`
	Queue          string            `avro:"queue"`
	Key            *string           `avro:"key"`
	IdempotencyKey *string           `avro:"idempotency_key"`
	Attempt        int32             `avro:"attempt"`
	MaxAttempts    *int32            `avro:"max_attempts"`
	CreatedAt      int64             `avro:"created_at"` // epoch milliseconds
	RunAt          *int64            `avro:"run_at"`
	ExpiresAt      *int64            `avro:"expires_at"`
	Headers        map[string]string `avro:"headers"`
	Origin         *string           `avro:"origin"`
	Errors         []JobError        `avro:"errors"`
	Replays        int32             `avro:"replays"`
}

func main() {
	schemaDirs := flag.String("schemas", "", "schema directories, comma-separated")
	url := flag.String("url", "amqp://guest:guest@127.0.0.1:5672/", "RabbitMQ URL")
	prefix := flag.String("prefix", "bridge", "bridge's prefix: jobs go to the exchange <prefix>.jobs")
	queue := flag.String("queue", "", "the queue the job runs on")
	n := flag.Int("n", 0, "test.Echo n")
	text := flag.String("text", "", "test.Echo text")
	key := flag.String("key", "", "the job's ordering key")
	fingerprints := flag.Bool("fingerprints", false, "print the schemas' fingerprints and exit")
	flag.Parse()

	schemas, err := load(strings.Split(*schemaDirs, ","),
		"bridge.JobError", "bridge.JobEnvelope", "bridge.DeadLetter", "test.Echo")
	check(err)
	if *fingerprints {
		for _, name := range []string{"bridge.JobError", "bridge.JobEnvelope", "bridge.DeadLetter", "test.Echo"} {
			fp, err := schemas[name].FingerprintUsing(avro.CRC64AvroLE)
			check(err)
			fmt.Printf("%s %016x\n", name, binary.LittleEndian.Uint64(fp))
		}
		return
	}
	payload, err := singleObject(schemas["test.Echo"], Echo{N: int32(*n), Text: *text})
	check(err)
	now := time.Now()
	origin := "interop-go"
	var jobKey *string // null unless given
	if *key != "" {
		jobKey = key
	}
	envelope := Envelope{
		ID: uuid7(now), Type: "test.Echo", Payload: payload, Queue: *queue, Key: jobKey, Attempt: 1,
		CreatedAt: now.UnixMilli(), Headers: map[string]string{"producer": "go"}, Origin: &origin,
		Errors: []JobError{},
	}
	body, err := singleObject(schemas["bridge.JobEnvelope"], envelope)
	check(err)
	check(publish(*url, *prefix+".jobs", *queue, body))
	fmt.Println(envelope.ID)
}

// load parses the named schemas from `<name>.avsc` files in dirs, in the order given: hamba/avro
// resolves a reference only to a schema parsed before it.
func load(dirs []string, names ...string) (map[string]avro.Schema, error) {
	cache := &avro.SchemaCache{}
	schemas := map[string]avro.Schema{}
	for _, name := range names {
		text, err := readFirst(dirs, name+".avsc")
		if err != nil {
			return nil, err
		}
		var definition any
		if err := json.Unmarshal(text, &definition); err != nil {
			return nil, fmt.Errorf("%s: %w", name, err)
		}
		stripped, _ := json.Marshal(withoutLogicalTypes(definition))
		if schemas[name], err = avro.ParseBytesWithCache(stripped, "", cache); err != nil {
			return nil, fmt.Errorf("%s: %w", name, err)
		}
	}
	return schemas, nil
}

func readFirst(dirs []string, file string) ([]byte, error) {
	for _, dir := range dirs {
		if text, err := os.ReadFile(filepath.Join(dir, file)); err == nil {
			return text, nil
		}
	}
	return nil, fmt.Errorf("no %s in %v", file, dirs)
}

// withoutLogicalTypes drops every "logicalType" annotation. hamba/avro keeps them in what it
// fingerprints, against the Avro specification's Parsing Canonical Form, so its fingerprint of
// any schema with a timestamp-millis field (bridge.JobEnvelope) is not the one bridge and Apache
// Avro compute. The bytes on the wire are the same either way: a timestamp-millis is a long.
func withoutLogicalTypes(node any) any {
	switch node := node.(type) {
	case map[string]any:
		delete(node, "logicalType")
		for key, value := range node {
			node[key] = withoutLogicalTypes(value)
		}
	case []any:
		for i, value := range node {
			node[i] = withoutLogicalTypes(value)
		}
	}
	return node
}

// singleObject encodes v in Avro's single-object encoding: C3 01, the schema's CRC-64-AVRO
// fingerprint (little-endian), the Avro binary body.
func singleObject(schema avro.Schema, v any) ([]byte, error) {
	codec, err := soe.NewCodec(schema)
	if err != nil {
		return nil, err
	}
	return codec.Encode(v)
}

// publish sends body and returns once RabbitMQ confirmed it. Mandatory: a message that no queue
// takes is returned, and then counts as a failure even though the broker acks it.
func publish(url, exchange, queue string, body []byte) error {
	conn, err := amqp.Dial(url)
	if err != nil {
		return err
	}
	defer conn.Close()
	ch, err := conn.Channel()
	if err != nil {
		return err
	}
	if err := ch.Confirm(false); err != nil {
		return err
	}
	returned := ch.NotifyReturn(make(chan amqp.Return, 1))
	closed := ch.NotifyClose(make(chan *amqp.Error, 1))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	message := amqp.Publishing{DeliveryMode: amqp.Persistent, Body: body}
	confirmation, err := ch.PublishWithDeferredConfirmWithContext(ctx, exchange, queue, true, false, message)
	if err != nil {
		return err
	}
	acked, err := confirmation.WaitContext(ctx)
	switch {
	case err != nil:
		return err
	case !acked:
		select { // the channel closed before its confirm: say why (a missing exchange, say)
		case e := <-closed:
			if e != nil {
				return fmt.Errorf("RabbitMQ closed the channel publishing to %s: %s", exchange, e.Reason)
			}
		default:
		}
		return fmt.Errorf("RabbitMQ refused the publish to %s", queue)
	}
	select { // a return comes before the ack of the same message
	case r := <-returned:
		return fmt.Errorf("no queue %q is bound to %s: %s", queue, exchange, r.ReplyText)
	default:
		return nil
	}
}

// uuid7 is a UUIDv7 (RFC 9562): 48 bits of Unix milliseconds, the version, then random bits.
func uuid7(now time.Time) string {
	var u [16]byte
	_, _ = rand.Read(u[6:])
	binary.BigEndian.PutUint64(u[:8], uint64(now.UnixMilli())<<16|uint64(binary.BigEndian.Uint16(u[6:8])))
	u[6] = 0x70 | u[6]&0x0F
	u[8] = 0x80 | u[8]&0x3F
	return fmt.Sprintf("%x-%x-%x-%x-%x", u[0:4], u[4:6], u[6:8], u[8:10], u[10:])
}

func check(err error) {
	if err != nil {
		log.Fatal(err)
	}
}
