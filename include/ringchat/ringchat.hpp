#pragma once

/// Everything in ringchat: include this, or the one header you need.
#include <ringchat/address.hpp>
#include <ringchat/buffer.hpp>
#include <ringchat/channel.hpp>
#include <ringchat/error.hpp>
#include <ringchat/io_context.hpp>
#include <ringchat/log.hpp>
#include <ringchat/ops.hpp>
#include <ringchat/producer.hpp>
#include <ringchat/socket.hpp>
#include <ringchat/task.hpp>
