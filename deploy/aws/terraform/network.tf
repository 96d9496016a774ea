# --- the egress VPC -------------------------------------------------------------------------------

resource "aws_vpc" "egress" {
  cidr_block           = var.egress_vpc_cidr
  enable_dns_support   = true
  enable_dns_hostnames = true
  tags                 = merge(local.tags, { Name = "${var.name}-egress" })
}

# No rule at all: nothing may use the default security group.
resource "aws_default_security_group" "egress" {
  vpc_id = aws_vpc.egress.id
  tags   = merge(local.tags, { Name = "${var.name}-default-unused" })
}

resource "aws_internet_gateway" "egress" {
  vpc_id = aws_vpc.egress.id
  tags   = merge(local.tags, { Name = "${var.name}-igw" })
}

resource "aws_subnet" "public" {
  for_each                = local.public_cidrs
  vpc_id                  = aws_vpc.egress.id
  availability_zone       = each.key
  cidr_block              = each.value
  map_public_ip_on_launch = false
  tags                    = merge(local.tags, { Name = "${var.name}-public-${each.key}" })
}

resource "aws_subnet" "appliance" {
  for_each                = local.appliance_cidrs
  vpc_id                  = aws_vpc.egress.id
  availability_zone       = each.key
  cidr_block              = each.value
  map_public_ip_on_launch = false
  tags                    = merge(local.tags, { Name = "${var.name}-appliance-${each.key}" })
}

# One NAT gateway per AZ, so an AZ failure takes out only its own instances. Their Elastic IPs are
# the addresses the Internet sees: the aws:SourceIp of deploy/aws/policies.
resource "aws_eip" "nat" {
  for_each = local.public_cidrs
  domain   = "vpc"
  tags     = merge(local.tags, { Name = "${var.name}-nat-${each.key}" })
}

resource "aws_nat_gateway" "egress" {
  for_each      = local.public_cidrs
  allocation_id = aws_eip.nat[each.key].id
  subnet_id     = aws_subnet.public[each.key].id
  tags          = merge(local.tags, { Name = "${var.name}-nat-${each.key}" })
  depends_on    = [aws_internet_gateway.egress]
}

resource "aws_route_table" "public" {
  vpc_id = aws_vpc.egress.id
  tags   = merge(local.tags, { Name = "${var.name}-public" })
}

resource "aws_route" "public_default" {
  route_table_id         = aws_route_table.public.id
  destination_cidr_block = "0.0.0.0/0"
  gateway_id             = aws_internet_gateway.egress.id
}

resource "aws_route_table_association" "public" {
  for_each       = aws_subnet.public
  subnet_id      = each.value.id
  route_table_id = aws_route_table.public.id
}

# Appliance subnets: the Internet through the AZ's NAT gateway; the clients through the peering.
resource "aws_route_table" "appliance" {
  for_each = local.appliance_cidrs
  vpc_id   = aws_vpc.egress.id
  tags     = merge(local.tags, { Name = "${var.name}-appliance-${each.key}" })
}

resource "aws_route" "appliance_default" {
  for_each               = aws_route_table.appliance
  route_table_id         = each.value.id
  destination_cidr_block = "0.0.0.0/0"
  nat_gateway_id         = aws_nat_gateway.egress[each.key].id
}

resource "aws_route" "appliance_to_browser" {
  for_each                  = aws_route_table.appliance
  route_table_id            = each.value.id
  destination_cidr_block    = data.aws_vpc.browser.cidr_block
  vpc_peering_connection_id = aws_vpc_peering_connection.browser.id
}

resource "aws_route_table_association" "appliance" {
  for_each       = aws_subnet.appliance
  subnet_id      = each.value.id
  route_table_id = aws_route_table.appliance[each.key].id
}

# S3 through a gateway endpoint whose policy admits only the organization's buckets
# (deploy/aws/policies/vpc-endpoint-policy.json.tftpl): the binary and rule downloads, and the
# clients' S3 traffic that egressd allows, never reach a bucket outside the organization.
resource "aws_vpc_endpoint" "s3" {
  vpc_id            = aws_vpc.egress.id
  service_name      = "com.amazonaws.${data.aws_region.current.name}.s3"
  vpc_endpoint_type = "Gateway"
  route_table_ids   = [for rt in aws_route_table.appliance : rt.id]
  policy = templatefile("${path.module}/../policies/vpc-endpoint-policy.json.tftpl", {
    organization_id           = var.organization_id
    trusted_resource_accounts = var.trusted_resource_accounts
    aws_owned_read_arns       = local.aws_owned_read_arns
  })
  tags = merge(local.tags, { Name = "${var.name}-s3" })
}

# --- the browser VPC: peering, routes, DHCP options -----------------------------------------------

resource "aws_vpc_peering_connection" "browser" {
  vpc_id      = aws_vpc.egress.id
  peer_vpc_id = var.browser_vpc_id
  auto_accept = true
  tags        = merge(local.tags, { Name = "${var.name}-browser" })
}

# The browser subnets reach the egress VPC (the load balancer) and nothing else: their route
# tables must not hold a default route, or clients could go around egressd.
resource "aws_route" "browser_to_egress" {
  for_each                  = toset(var.browser_route_table_ids)
  route_table_id            = each.value
  destination_cidr_block    = var.egress_vpc_cidr
  vpc_peering_connection_id = aws_vpc_peering_connection.browser.id

  lifecycle {
    precondition {
      condition = alltrue([
        for r in data.aws_route_table.browser[each.value].routes :
        r.cidr_block != "0.0.0.0/0" && r.ipv6_cidr_block != "::/0"
      ])
      error_message = "A browser route table has a default route: remove it, or clients bypass egressd."
    }
  }
}

# The browser VPC resolves names through egressd's DNS firewall, at the load balancer's fixed
# addresses. The egress VPC keeps the Amazon-provided resolver (egressd's own upstream).
resource "aws_vpc_dhcp_options" "browser" {
  domain_name         = var.browser_domain_name != "" ? var.browser_domain_name : null
  domain_name_servers = values(local.nlb_ips)
  tags                = merge(local.tags, { Name = "${var.name}-browser-dns" })
}

resource "aws_vpc_dhcp_options_association" "browser" {
  vpc_id          = var.browser_vpc_id
  dhcp_options_id = aws_vpc_dhcp_options.browser.id
}

# --- flow logs of the egress VPC ---------------------------------------------------------------

resource "aws_flow_log" "egress" {
  vpc_id                   = aws_vpc.egress.id
  traffic_type             = "ALL"
  log_destination_type     = "cloud-watch-logs"
  log_destination          = aws_cloudwatch_log_group.flow_logs.arn
  iam_role_arn             = aws_iam_role.flow_logs.arn
  max_aggregation_interval = 60
  tags                     = local.tags
}

resource "aws_cloudwatch_log_group" "flow_logs" {
  name              = "/egressd/${var.name}/flow-logs"
  retention_in_days = var.flow_log_retention_days
  kms_key_id        = aws_kms_key.logs.arn
  tags              = local.tags
}

resource "aws_kms_key" "logs" {
  description             = "${var.name}: encrypts the egress VPC flow logs"
  enable_key_rotation     = true
  deletion_window_in_days = 30
  policy                  = data.aws_iam_policy_document.logs_key.json
  tags                    = local.tags
}

data "aws_iam_policy_document" "logs_key" {
  # A key policy's resource is always the key itself ("*").
  #checkov:skip=CKV_AWS_109:A KMS key policy applies to its own key only; "*" is that key, and the account root is the documented administrator principal.
  #checkov:skip=CKV_AWS_111:Same: the key policy's resource "*" is this key alone.
  #checkov:skip=CKV_AWS_356:Same: the key policy's resource "*" is this key alone.
  statement {
    sid       = "AccountAdministers"
    actions   = ["kms:*"]
    resources = ["*"]

    principals {
      type        = "AWS"
      identifiers = ["arn:${data.aws_partition.current.partition}:iam::${data.aws_caller_identity.current.account_id}:root"]
    }
  }

  statement {
    sid       = "CloudWatchLogsUsesForFlowLogs"
    actions   = ["kms:Encrypt*", "kms:Decrypt*", "kms:ReEncrypt*", "kms:GenerateDataKey*", "kms:Describe*"]
    resources = ["*"]

    principals {
      type        = "Service"
      identifiers = ["logs.${data.aws_region.current.name}.amazonaws.com"]
    }

    condition {
      test     = "ArnEquals"
      variable = "kms:EncryptionContext:aws:logs:arn"
      values   = ["arn:${data.aws_partition.current.partition}:logs:${data.aws_region.current.name}:${data.aws_caller_identity.current.account_id}:log-group:/egressd/${var.name}/flow-logs"]
    }
  }
}

resource "aws_iam_role" "flow_logs" {
  name_prefix        = "${var.name}-flow-logs-"
  assume_role_policy = data.aws_iam_policy_document.flow_logs_assume.json
  tags               = local.tags
}

data "aws_iam_policy_document" "flow_logs_assume" {
  statement {
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = ["vpc-flow-logs.amazonaws.com"]
    }

    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [data.aws_caller_identity.current.account_id]
    }
  }
}

resource "aws_iam_role_policy" "flow_logs" {
  name   = "write-flow-logs"
  role   = aws_iam_role.flow_logs.id
  policy = data.aws_iam_policy_document.flow_logs.json
}

data "aws_iam_policy_document" "flow_logs" {
  statement {
    actions   = ["logs:CreateLogStream", "logs:PutLogEvents", "logs:DescribeLogStreams"]
    resources = [aws_cloudwatch_log_group.flow_logs.arn, "${aws_cloudwatch_log_group.flow_logs.arn}:*"]
  }
}
