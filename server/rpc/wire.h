// Requests and responses as bytes, for the methods the service registers raw
// (Extract, ExtractStream, Tokenize: the ones whose requests carry client
// strings). gRPC's own parsing of a request protobuf refuses (a string field
// that is not UTF-8, or bytes that are not the message) gives the client no
// usable error: UNIMPLEMENTED with an empty message on unary requests, and on
// a bidi stream a failed read that looks like the client closing its side,
// so the stream ended with OK and the requests sent after it were dropped.
// Parsing here turns it into an INVALID_ARGUMENT that names the field.
#ifndef SAE_RPC_WIRE_H_
#define SAE_RPC_WIRE_H_

#include <grpcpp/support/byte_buffer.h>

#include <string>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "google/protobuf/message.h"

namespace sae {

// Parses `bytes` into `message`. INVALID_ARGUMENT naming the first string
// field (by path, e.g. "watch[1].sae") that is not valid UTF-8, with the bad
// byte and its offset; or saying the bytes are not a message of that type.
absl::Status ParseMessage(const grpc::ByteBuffer& bytes, google::protobuf::Message* message);

// For a request ParseMessage refused: its top-level string field `name` when
// that one can be read and is valid UTF-8, else "". ExtractStream echoes the
// request_id of a request it could not parse, so the client can tell which
// request failed.
std::string ReadStringField(const grpc::ByteBuffer& bytes, const google::protobuf::Descriptor& type,
                            absl::string_view name);

// Serializes `message` for a raw write. RESOURCE_EXHAUSTED above protobuf's
// 2 GiB message limit (an Extract response of one huge chunk).
absl::Status SerializeMessage(const google::protobuf::Message& message, grpc::ByteBuffer* bytes);

}  // namespace sae

#endif  // SAE_RPC_WIRE_H_
