#include "rpc/wire.h"

#include <grpcpp/support/proto_buffer_writer.h>

#include <climits>
#include <map>
#include <optional>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/status_macros.h"
#include "google/protobuf/descriptor.h"
#include "google/protobuf/io/coded_stream.h"
#include "google/protobuf/unknown_field_set.h"
#include "google/protobuf/wire_format_lite.h"
#include "tokenizer/tokenizer.h"

namespace sae {
namespace {

using google::protobuf::Descriptor;
using google::protobuf::FieldDescriptor;
using google::protobuf::UnknownField;
using google::protobuf::UnknownFieldSet;

// Deeper than any sae.v1 message nests; bounds the recursion on hostile input.
constexpr int kMaxDepth = 32;

std::optional<std::string> Flatten(const grpc::ByteBuffer& bytes) {
  std::vector<grpc::Slice> slices;
  if (!bytes.Dump(&slices).ok()) return std::nullopt;
  std::string data;
  data.reserve(bytes.Length());
  for (const grpc::Slice& slice : slices) data.append(reinterpret_cast<const char*>(slice.begin()), slice.size());
  return data;
}

// The first string field of `data`, read as `type`, that is not valid UTF-8
// (in wire order, nested messages included), as an INVALID_ARGUMENT; OK when
// there is none or `data` does not parse (the full parse reports that).
absl::Status CheckStrings(const std::string& data, const Descriptor& type, const std::string& prefix, int depth) {
  UnknownFieldSet fields;
  if (depth > kMaxDepth || !fields.ParseFromString(data)) return absl::OkStatus();
  std::map<int, int> seen;  // field number -> occurrences so far, for the index of repeated fields
  for (int i = 0; i < fields.field_count(); ++i) {
    const UnknownField& field = fields.field(i);
    const int occurrence = seen[field.number()]++;
    const FieldDescriptor* fd = type.FindFieldByNumber(field.number());
    if (fd == nullptr || field.type() != UnknownField::TYPE_LENGTH_DELIMITED) continue;
    const std::string path =
        absl::StrCat(prefix, fd->name(), fd->is_repeated() ? absl::StrCat("[", occurrence, "]") : "");
    const std::string& value = field.length_delimited();
    if (fd->type() == FieldDescriptor::TYPE_STRING) {
      if (const std::optional<size_t> bad = FindInvalidUtf8(value); bad.has_value()) {
        return absl::InvalidArgumentError(
            absl::StrFormat("%s is not valid UTF-8: invalid byte 0x%02X at byte offset %d (string fields must be "
                            "UTF-8)",
                            path, static_cast<uint8_t>(value[*bad]), *bad));
      }
    } else if (fd->type() == FieldDescriptor::TYPE_MESSAGE) {
      RETURN_IF_ERROR(CheckStrings(value, *fd->message_type(), path + ".", depth + 1));
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status ParseMessage(const grpc::ByteBuffer& bytes, google::protobuf::Message* message) {
  const std::optional<std::string> data = Flatten(bytes);
  if (!data.has_value()) return absl::InvalidArgumentError("the request's bytes could not be read");
  // Checked before parsing: protobuf would refuse the message too, but only
  // after logging an error per bad request.
  RETURN_IF_ERROR(CheckStrings(*data, *message->GetDescriptor(), "", 0));
  if (!message->ParseFromString(*data)) {
    return absl::InvalidArgumentError(
        absl::StrCat("the request (", data->size(), " bytes) is not a valid ", message->GetTypeName(), " message"));
  }
  return absl::OkStatus();
}

std::string ReadStringField(const grpc::ByteBuffer& bytes, const Descriptor& type, absl::string_view name) {
  using google::protobuf::internal::WireFormatLite;
  const FieldDescriptor* fd = type.FindFieldByName(std::string(name));
  const std::optional<std::string> data = Flatten(bytes);
  if (fd == nullptr || fd->type() != FieldDescriptor::TYPE_STRING || !data.has_value()) return "";
  google::protobuf::io::CodedInputStream in(reinterpret_cast<const uint8_t*>(data->data()),
                                            static_cast<int>(data->size()));
  // Field by field up to the first malformed one, so a request cut short
  // after the field still gives it; the last occurrence wins, as in a parse.
  std::string value, field;
  for (uint32_t tag = in.ReadTag(); tag != 0; tag = in.ReadTag()) {
    if (WireFormatLite::GetTagFieldNumber(tag) == fd->number() &&
        WireFormatLite::GetTagWireType(tag) == WireFormatLite::WIRETYPE_LENGTH_DELIMITED) {
      if (!WireFormatLite::ReadBytes(&in, &field)) break;
      value = field;
    } else if (!WireFormatLite::SkipField(&in, tag)) {
      break;
    }
  }
  return FindInvalidUtf8(value).has_value() ? "" : value;
}

absl::Status SerializeMessage(const google::protobuf::Message& message, grpc::ByteBuffer* bytes) {
  const size_t size = message.ByteSizeLong();
  if (size > static_cast<size_t>(INT_MAX)) {
    return absl::ResourceExhaustedError(
        absl::StrCat("a ", message.GetTypeName(), " of ", size, " bytes is over protobuf's 2 GiB message limit"));
  }
  bytes->Clear();  // the previous write's message: the writer appends only to an empty buffer
  grpc::ProtoBufferWriter writer(bytes, grpc::kProtoBufferWriterMaxBufferLength, static_cast<int>(size));
  if (!message.SerializeToZeroCopyStream(&writer)) {
    return absl::InternalError(absl::StrCat("serializing a ", message.GetTypeName(), " failed"));
  }
  return absl::OkStatus();
}

}  // namespace sae
