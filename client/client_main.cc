// sae-client: command-line client of sae.v1.SaeService. See RunClient.
#include <iostream>
#include <string>
#include <vector>

#include "sae_client.h"

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  return sae::client::RunClient(args, std::cout, std::cerr);
}
