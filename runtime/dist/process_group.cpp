#include "dist/process_group.h"

#include "core/log.h"
#include "core/status.h"
#include "dist/gloo_communicator.h"
#include "dist/rendezvous.h"

namespace dsrt {

std::unique_ptr<Communicator> join_process_group(const DistSpec &spec, const std::string &checkpoint,
                                                 const DeviceJoin &device) {
  require_gloo();
  Mapping m{spec.world, spec.rank, spec.tp, spec.ep, spec.dp_attention};
  m.validate();
  std::string host;
  int port = 0;
  split_host_port(spec.coordinator, host, port);
  RankHello me{spec.rank, spec.world, spec.tp, spec.ep, dsrt_version_string(), checkpoint, spec.dp_attention};
  std::unique_ptr<RendezvousServer> server;
  if (spec.rank == 0) server = std::make_unique<RendezvousServer>(host, port, me, spec.timeout_ms);
  RendezvousClient store(host, port, spec.timeout_ms);
  store.hello(me);
  auto comm = make_gloo_communicator(store, m, spec.timeout_ms);
  if (device) comm = device(store, std::move(comm));
  comm->barrier();  // every rank is connected: nobody needs the store any more
  store.bye();
  if (server) server->finish();
  log(LogLevel::Info, "dsrt: joined as " + m.str() + " through " + spec.coordinator);
  return comm;
}

}  // namespace dsrt
