#pragma once
// moekit: Mixture-of-Experts layers for CPUs, in one process: the header users include. It needs
// Eigen, oneTBB and Boost's header-only libraries, and nothing of MPI: expert parallelism over MPI
// ranks is <moekit/distributed.hpp>.
//
//   using Layer = moekit::MoELayer<moekit::TopK<2>, moekit::AuxLoss, moekit::Dropless,
//                                  moekit::GroupedGemm>;
//
// Policies, one header each:
//   router/    TopK<K>, Switch (= TopK<1>)               router/top_k.hpp
//              Hash (by token id)                       router/hash.hpp
//              ExpertChoice (each expert its C tokens)  router/expert_choice.hpp
//   balance/   AuxLoss                                  balance/aux_loss.hpp
//              AuxFree                                  balance/aux_free.hpp
//              NoBalance                                balance/no_balance.hpp
//              Sinkhorn                                 balance/sinkhorn.hpp
//              ZLoss                                    balance/z_loss.hpp
//              SeqAuxLoss                               balance/seq_aux_loss.hpp
//              ImportanceLoss, LoadLoss                 balance/importance_and_load.hpp
//              Balanced<Terms...> (several at once)     balance/balanced.hpp
//   dispatch/  Dropless                                 dispatch/dropless.hpp
//              Capacity, DropPolicy                     dispatch/capacity.hpp
//   expert/    GroupedGemm, GroupedGemmType<Act>        expert/grouped_gemm.hpp
//              PerExpertLoop, PerExpertLoopType<Act>    expert/per_expert_loop.hpp
//              SwiGLU, GeLU, ReLU                       expert/activation.hpp
//   parallel/  SingleProcess                            parallel/single_process.hpp
// The layer: MoELayer<Ps...> (layer/compose.hpp), BasicMoELayer (layer/moe_layer.hpp),
// RoutingStats and JsonLinesLogger (layer/routing_stats.hpp).
// Tools: safetensors files (io/safetensors.hpp), Adam (optim/adam.hpp), experts from a dense
// FFN (layer/upcycle.hpp).
// For writing a policy: the concepts (core/concepts.hpp), moekit::require and moekit::fail
// (core/error.hpp), the loops over tokens (core/token_loops.hpp), counter-based random draws
// (core/random.hpp).
// Not included here: ExpertParallel and the process grid (<moekit/distributed.hpp>), and the
// reader of Hugging Face fixture files that moekit-verify and the tests use (io/hf_block.hpp).
#include <moekit/balance/aux_free.hpp>
#include <moekit/balance/aux_loss.hpp>
#include <moekit/balance/balanced.hpp>
#include <moekit/balance/importance_and_load.hpp>
#include <moekit/balance/no_balance.hpp>
#include <moekit/balance/seq_aux_loss.hpp>
#include <moekit/balance/sinkhorn.hpp>
#include <moekit/balance/z_loss.hpp>
#include <moekit/layer/compose.hpp>
#include <moekit/core/concepts.hpp>
#include <moekit/core/error.hpp>
#include <moekit/core/group.hpp>
#include <moekit/core/random.hpp>
#include <moekit/core/routing.hpp>
#include <moekit/core/tensor.hpp>
#include <moekit/core/token_loops.hpp>
#include <moekit/dispatch/capacity.hpp>
#include <moekit/dispatch/dropless.hpp>
#include <moekit/expert/activation.hpp>
#include <moekit/expert/grouped_gemm.hpp>
#include <moekit/expert/per_expert_loop.hpp>
#include <moekit/expert/shared.hpp>
#include <moekit/io/safetensors.hpp>
#include <moekit/layer/moe_layer.hpp>
#include <moekit/layer/routing_stats.hpp>
#include <moekit/layer/upcycle.hpp>
#include <moekit/optim/adam.hpp>
#include <moekit/parallel/single_process.hpp>
#include <moekit/router/expert_choice.hpp>
#include <moekit/router/hash.hpp>
#include <moekit/router/top_k.hpp>
